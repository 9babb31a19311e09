"""``tensorparity dataloader-state``: output, --json, and bad input as one-line errors that name
the file and the fix. Valid folders come from the real legacy producer; the broken ones are its
files edited by hand (the only hand-made bytes are the corrupt and malicious ones)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.examples.legacy_loader import run_legacy_training

runner = CliRunner(env={"COLUMNS": "160"})


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, ["dataloader-state", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def legacy_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shuffled map-style run read in the main process, checkpointed at epoch 1, step 3."""
    return run_legacy_training(tmp_path_factory.mktemp("legacy") / "state", num_workers=0, stop_epoch=1,
                               stop_step=3).folder


@pytest.fixture
def legacy(legacy_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(legacy_template, tmp_path / "legacy"))


@pytest.fixture(scope="module")
def two_worker_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_legacy_training(tmp_path_factory.mktemp("legacy2") / "state", num_workers=2, stop_epoch=0,
                               stop_step=3).folder


def edit(path: Path, **changes: object) -> None:
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def test_convert_prints_the_record_and_writes_a_loadable_state(legacy: Path, tmp_path: Path) -> None:
    out = tmp_path / "state.pt"
    result = invoke("convert", legacy, out)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "legacy epoch 1 step 3 (map-style)" in text and "verified: a StatefulDataLoader restored from it" in text
    assert "shuffle=True" in text and "weights_only=True" in text
    state = torch.load(out, weights_only=True)
    assert state["_num_yielded"] == 3 and state["_sampler_iter_state"]["samples_yielded"] == 12
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_convert_json_and_remap(two_worker_template: Path, tmp_path: Path) -> None:
    result = invoke("convert", two_worker_template, tmp_path / "s.pt", "--num-workers", "3", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["schema"] == "tensorparity.dataloader_state_conversion/1"
    assert record["remapped"] is True and record["result"]["num_workers"] == 3
    assert record["source"]["workers"][1]["samples"] == 4 and record["result"]["next_worker"] == 0
    assert "num_workers=3" in record["loader_recipe"]


def test_inspect_both_sides(legacy: Path, tmp_path: Path) -> None:
    assert invoke("convert", legacy, tmp_path / "s.pt", "--no-verify").exit_code == 0
    old = json.loads(invoke("inspect", legacy, "--json").stdout)
    new = json.loads(invoke("inspect", tmp_path / "s.pt", "--json").stdout)
    assert (old["layout"], new["layout"]) == ("legacy/1", "torchdata")
    assert old["samples_in_epoch"] == new["samples_in_epoch"] == 12
    shown = invoke("inspect", tmp_path / "s.pt")
    assert shown.exit_code == 0 and "RandomSampler, generator freshly seeded 1235" in shown.stdout


@pytest.mark.parametrize(("damage", "needles"), [
    ("missing_worker", ("worker_0.json", "missing worker_0.json", "fix: copy the loader_state file")),
    ("bad_count", ("worker_0.json [samples_streamed]", "disagrees with loader_state.json", "fix:")),
    ("unknown_version", ("loader_state.json [version]", "unknown legacy loader-state version 7",
                         "fix: upgrade tensorparity")),
    ("corrupt_json", ("worker_0.json", "not valid JSON", "fix: restore the file")),
    ("bad_global_step", ("loader_state.json [global_step]", "is not epoch 1 x 6 batches", "fix:")),
    ("stale_epoch", ("worker_0.json [epoch]", "written in epoch 0", "fix:")),
    ("extra_worker", ("worker_1.json", "says num_workers 0", "fix: remove files left by a run with more workers")),
    ("both_formats", ("both loader_state.json and loader_state.pt exist", "fix:")),
    ("missing_field", ("loader_state.json [batch_size]", "required field is missing", "fix:")),
    ("not_a_record", ("loader_state.json", "holds a list", "fix:")),
])
def test_bad_legacy_input_is_one_line(legacy: Path, tmp_path: Path, damage: str, needles: tuple[str, ...]) -> None:
    g, w = legacy / "loader_state.json", legacy / "worker_0.json"
    if damage == "missing_worker":
        w.unlink()
    elif damage == "bad_count":
        edit(w, samples_streamed=11)
    elif damage == "unknown_version":
        edit(g, version=7)
    elif damage == "corrupt_json":
        w.write_bytes(w.read_bytes()[:20])  # what a crash in the middle of the old writer leaves
    elif damage == "bad_global_step":
        edit(g, global_step=99)
    elif damage == "stale_epoch":
        edit(w, epoch=0)
    elif damage == "extra_worker":
        shutil.copy(w, legacy / "worker_1.json")
    elif damage == "both_formats":
        torch.save(json.loads(g.read_text()), legacy / "loader_state.pt")
    elif damage == "missing_field":
        record = json.loads(g.read_text())
        del record["batch_size"]
        g.write_text(json.dumps(record))
    elif damage == "not_a_record":
        g.write_text("[1, 2]")
    out = tmp_path / "state.pt"
    assert_one_line_error(invoke("convert", legacy, out), *needles)
    assert not out.exists()


def test_malicious_torch_record_is_refused_without_running_it(tmp_path: Path) -> None:
    folder = run_legacy_training(tmp_path / "legacy", num_workers=0, stop_epoch=0, stop_step=1, fmt="torch").folder
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"worker_id": 0, "epoch": 0, "samples_streamed": Payload()}, folder / "worker_0.pt")
    line = assert_one_line_error(invoke("convert", folder, tmp_path / "s.pt"), "worker_0.pt", "refused")
    assert "fix:" in line
    assert not marker.exists()


def test_iterable_remap_refused_on_the_command_line(tmp_path: Path) -> None:
    folder = run_legacy_training(tmp_path / "legacy", dataset_kind="iterable", num_workers=0, stop_epoch=0,
                                 stop_step=1).folder
    assert_one_line_error(invoke("convert", folder, tmp_path / "s.pt", "-w", "2"),
                          "cannot re-map an iterable dataset from 0 to 2 workers", "fix: convert with --num-workers 0")


def test_usage_errors(legacy: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.pt"
    out.write_bytes(b"keep me")
    assert_one_line_error(invoke("convert", legacy, out), "the output file exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert_one_line_error(invoke("convert", legacy, legacy / "worker_0.json", "--force"),
                          "refusing to write the converted state over (or into) an input")
    assert_one_line_error(invoke("convert", legacy, tmp_path / "s.pt", "--sampler", "sequential"),
                          "the old run shuffled", "fix: use sampler 'random'")
    assert_one_line_error(invoke("convert", tmp_path / "nowhere", tmp_path / "s.pt"), "no such folder")
    assert_one_line_error(invoke("convert", legacy, tmp_path / "no" / "s.pt"), "the output folder does not exist")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    assert_one_line_error(invoke("inspect", junk), "junk.pt", "not a StatefulDataLoader state", "fix:")


def test_every_problem_is_reported_at_once(two_worker_template: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(two_worker_template, tmp_path / "legacy"))
    (folder / "worker_0.json").unlink()
    (folder / "worker_1.json").write_text("{")
    assert_one_line_error(invoke("convert", folder, tmp_path / "s.pt"), "2 problems", "missing worker_0.json",
                          "worker_1.json: not valid JSON", "fix:")


def test_disk_full_leaves_nothing_behind(legacy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def full(self: Path, data: bytes) -> int:  # the injected writer: the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    assert_one_line_error(invoke("convert", legacy, out / "s.pt"), "could not write the data-loader state",
                          "the disk is full (No space left on device)", "fix: free disk space")
    assert list(out.iterdir()) == []
