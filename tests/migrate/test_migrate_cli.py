"""`tensorparity migrate`: dry run, -o, --in-place --backup, --json, --to, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.examples import old_release
from _cli_helpers import assert_one_line_error

runner = CliRunner(env={"COLUMNS": "160"})
SPEC = str(old_release.SPEC)


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def old(tmp_path: Path) -> Path:
    return old_release.write_old_release(tmp_path / "run_v1.pt")


def test_dry_run_prints_plan_and_changes_and_writes_nothing(old: Path) -> None:
    before = sha(old)
    result = invoke("migrate", old, "--migrations", SPEC, "--dry-run", "--top", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("dry run: 1.0 -> 2.0 through 3 migrations: 2 renamed, 12 transformed, 3 changed; "
                          "nothing was written")
    assert "version     1.0  (from field 'release')" in out and "Plan, in order" in out
    assert "scheduler-epoch   up         function" in out
    assert "model.frontend.conv.weight -> model.pre_encode.weight" in out
    assert "scheduler.last_epoch  (0 -> 3)" in out and "… and 2 more" in out
    assert sha(old) == before and sorted(p.name for p in old.parent.iterdir()) == ["run_v1.pt"]


def test_in_place_with_backup_then_a_second_run_does_nothing(old: Path) -> None:
    result = invoke("migrate", old, "--migrations", SPEC, "--in-place", "--backup")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # long paths wrap
    assert out.startswith(f"migrated 1.0 -> 2.0 through 3 migrations: 2 renamed, 12 transformed, 3 changed; "
                          f"written in place (original kept as {old}.bak); verified bitwise")
    assert "141 untouched tensors bitwise equal to the source" in out
    again = invoke("migrate", old, "--migrations", SPEC, "--json")
    assert again.exit_code == 0
    data = json.loads(again.stdout)
    assert data["schema"] == "tensorparity.migrate/1" and data["verdict"] == "up to date"
    assert data["plan"]["version_origin"] == "tensorparity's record of the last migration"


def test_json_of_a_migration_to_another_file(old: Path, tmp_path: Path) -> None:
    result = invoke("migrate", old, "--migrations", "tensorparity.examples.old_release", "-o", tmp_path / "new.pt",
                    "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "migrated" and data["verified"] is True and data["output"] == str(tmp_path / "new.pt")
    assert data["counts"] == {"renamed": 2, "transformed": 12, "changed": 3}
    assert data["record"]["from"] == "1.0" and data["record"]["source"]["sha256"] == sha(old)
    assert [s["name"] for s in data["plan"]["steps"]] == ["rename-front-end", "split-qkv", "scheduler-epoch"]
    assert data["verification"]["untouched_tensors"] == 141 and data["verification"]["made_tensors"] == 12


def test_errors_are_one_line(old: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("migrate", old, "--migrations", tmp_path / "absent.yaml"),
                          "absent.yaml: no such migrations spec", "fix: check the path")
    assert_one_line_error(invoke("migrate", old, "--migrations", SPEC, "--dry-run", "--in-place"),
                          "--dry-run writes nothing", "fix: drop one of them")
    assert_one_line_error(invoke("migrate", old, "--migrations", SPEC, "--backup"),
                          "a backup is kept only when migrating in place")
    assert_one_line_error(invoke("migrate", old, "--migrations", SPEC, "--to", "one"), "'one' is not a version number")
    assert_one_line_error(invoke("migrate", tmp_path / "nope.pt", "--migrations", SPEC), "no such file or folder")
    assert invoke("migrate", old, "--migrations", SPEC, "--in-place").exit_code == 0
    assert_one_line_error(invoke("migrate", old, "--migrations", SPEC, "--to", "1.0"),
                          "newer than the target 1.0; going down needs the inverse of 'scheduler-epoch' (2.0)",
                          "fix: define `inverse` for those migrations")
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nmigrations:\n  - {version: '3.0', name: a, stpes: []}\n  - {version: 3.10, name: b}\n")
    assert_one_line_error(invoke("migrate", old, "--migrations", spec), "2 problems in the migrations spec",
                          "line 3: migrations[0].stpes: unknown field 'stpes'", "line 4:")
