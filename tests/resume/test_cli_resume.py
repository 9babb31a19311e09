"""``tensorparity resume-check`` and the report's renderings (text, rich, HTML, JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.examples.resume_recipes import Forgetful
from tensorparity.report._render import plain_text
from tensorparity.resume import ResumeReport, resume_check

RECIPES = "tensorparity.examples.resume_recipes"


@pytest.fixture(scope="module")
def forgot_scheduler() -> ResumeReport:
    return resume_check(Forgetful(forget="scheduler"), steps=7, resume_at=[2, 6])


def test_cli_pass_json_and_html(tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["resume-check", f"{RECIPES}:TinyRecipe", "-n", "5", "--resume-at", "2", "--resume-at", "3",
                                      "--json", "--no-confirm", "--html", str(html)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.resume/1" and data["verdict"] == "pass" and data["exit_code"] == 0
    assert [leg["points"] for leg in data["legs"]] == [[2], [3]]
    assert all(step["match"] for leg in data["legs"] for s in leg["segments"] for step in s["steps"])
    assert "resume at 2" in html.read_text() and "<table>" in html.read_text()


def test_cli_resume_bug_exits_1_and_names_the_state() -> None:
    wide = CliRunner(env={"COLUMNS": "120"})  # at 80 columns the loss headers fold onto two lines
    result = wide.invoke(app, ["resume-check", f"{RECIPES}:Forgetful", "-n", "6", "--resume-at", "3"])
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "resume bug: resume at 3" in out
    assert "optimizer state was not restored" in out and "[confirmed]" in out
    assert "Steps (uninterrupted vs resumed)" in out and "loss uninterrupted" in out


def test_cli_chain_and_dtype_tolerance() -> None:
    result = CliRunner().invoke(app, ["resume-check", f"{RECIPES}:TinyDefaultRecipe", "-n", "6", "--resume-at", "2", "--resume-at", "4",
                                      "--chain", "--tolerance", "dtype", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tolerance"]["profile"] == "dtype"
    assert [[s["start"], s["stop"]] for s in data["legs"][0]["segments"]] == [[2, 4], [4, 6]]


def test_report_renderings(forgot_scheduler: ResumeReport) -> None:
    r = forgot_scheduler
    assert r.verdict == "resume bug" and len(r.legs) == 2
    text = str(r)
    assert text.splitlines()[0].startswith("recipe")
    assert "scheduler last_epoch is 0, expected 2" in text and "scheduler last_epoch is 0, expected 6" in text
    assert "First divergence: step 4 differs first" in text
    assert "Confirmation" in text and "✓ taking scheduler" in text
    assert "<div class='tp-resume'>" in r._repr_html_() and "scheduler last_epoch" in r.to_html()
    data = r.to_dict()
    leg = data["legs"][0]
    assert leg["passed"] is False and leg["segments"][0]["divergence"]["step"] == 4
    assert leg["segments"][0]["findings"][0]["component"] == "scheduler"
    assert leg["confirmations"][0]["passed"] is True
    json.dumps(data, allow_nan=False)
    assert repr(r).startswith("<ResumeReport 'tensorparity.examples.resume_recipes:Forgetful': resume bug")
    # Folding keeps the first divergence in view.
    folded = plain_text(r.renderable(top=1), width=120)
    assert "… and 4 more" in folded and "\n4 " in folded


def test_keep_workdir(tmp_path: Path) -> None:
    resume_check(f"{RECIPES}:TinyRecipe", steps=3, resume_at=1, confirm=False, workdir=tmp_path)
    (run,) = tmp_path.iterdir()
    names = {p.name for p in run.iterdir()}
    assert "ckpt-1" in names and any(n.startswith("resume-1-0-after-load") for n in names)
