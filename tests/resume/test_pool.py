"""The fresh processes: each leg its own process, with a scrubbed environment; a job may bring its
own leg runner (what a framework integration uses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from resume_test_recipes import HERE

from tensorparity.resume._pool import fork_available, launcher
from tensorparity.resume._recipe_errors import RecipeError


@pytest.mark.skipif(not fork_available(), reason="fork isolation is Linux-only")
def test_forked_legs_are_separate_processes_with_a_clean_environment(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORPARITY_TOKEN", "secret")
    # The leg imports the runner's module by name, from the environment it is given.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    pool = launcher("fork", tmp_path)
    try:
        jobs = [pool.start({"runner": "resume_test_recipes:custom_runner", "work": str(tmp_path),
                            "result": str(tmp_path / f"r{i}.json"), "legs": [{"name": f"leg{i}"}]})
                for i in range(2)]
        legs = [job.wait(60)["legs"][0] for job in jobs]
    finally:
        pool.close()
    assert [leg["name"] for leg in legs] == ["leg0", "leg1"]
    assert len({leg["pid"] for leg in legs} | {os.getpid()}) == 3
    assert all(leg["tensorparity_vars"] == [] and leg["cwd"] == os.getcwd() for leg in legs)


@pytest.mark.skipif(not fork_available(), reason="fork isolation is Linux-only")
def test_a_leg_that_dies_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    pool = launcher("fork", tmp_path)
    try:
        job = pool.start({"runner": "resume_test_recipes:dying_runner", "work": str(tmp_path), "result": str(tmp_path / "r.json"),
                          "legs": [{"name": "doomed"}]})
        with pytest.raises(RecipeError, match="the fresh process running doomed exited before reporting back; its last output: about to crash"):
            job.wait(60)
    finally:
        pool.close()
