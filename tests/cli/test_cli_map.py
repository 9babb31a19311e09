"""`tensorparity map suggest`: exit codes (0 complete, 1 unmatched keys, 2 error), atomic -o that
refuses to overwrite without --force, --json, and the one-line error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.cli.map import map_app
from tensorparity.examples import from_reference, reference_model
from tensorparity.mapping import Mapping
from _cli_helpers import assert_one_line_error

runner = CliRunner(env={"COLUMNS": "160"})


def cli() -> typer.Typer:
    """The main app once `map` is registered in it; the sub-app on its own until then."""
    names = {getattr(g, "name", None) for g in app.registered_groups}
    return app if "map" in names else map_app


def invoke(*args: str | Path) -> object:
    prefix = ["map"] if cli() is app else []
    return runner.invoke(cli(), [*prefix, *(str(a) for a in args)])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The reference model as torch.save, its port (converted by its converter) as safetensors."""
    ref = reference_model().state_dict()
    out = {"ref": tmp_path / "ref.pt", "port": tmp_path / "port.safetensors", "odd": tmp_path / "odd.safetensors"}
    torch.save(ref, out["ref"])
    port = from_reference(ref)
    save_file(port, str(out["port"]))
    save_file({**port, "extra.scale": torch.ones(3)}, str(out["odd"]))
    return out


def test_writes_a_mapping_that_makes_diff_pass(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "map.yaml"
    result = invoke("suggest", files["ref"], files["port"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "31 pairs (27 identical bytes, 4 concatenated) in 10 rules; every key has a partner" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert len(Mapping.from_yaml(out).rules) == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    checked = runner.invoke(app, ["diff", str(files["ref"]), str(files["port"]), "--map", str(out)])
    assert checked.exit_code == 0, checked.output


def test_refuses_to_overwrite_without_force(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "map.yaml"
    out.write_text("keep me\n")
    result = invoke("suggest", files["ref"], files["port"], "-o", out)
    assert_one_line_error(result, "map.yaml", "the output file exists", "fix: pass --overwrite to replace it")
    assert out.read_text() == "keep me\n"
    forced = invoke("suggest", files["ref"], files["port"], "-o", out, "--force")
    assert forced.exit_code == 0 and Mapping.from_yaml(out).name == "suggested"


def test_never_writes_over_an_input(files: dict[str, Path]) -> None:
    before = files["port"].read_bytes()
    result = invoke("suggest", files["ref"], files["port"], "-o", files["port"], "--force")
    assert_one_line_error(result, "refusing to write the mapping over", "fix: write the mapping to another path")
    assert files["port"].read_bytes() == before


def test_unmatched_keys_exit_1_and_are_listed(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "map.yaml"
    result = invoke("suggest", files["ref"], files["odd"], "-o", out)
    assert result.exit_code == 1, result.output
    assert "unmatched: 0 of A, 1 of B" in result.stdout and "extra.scale" in result.stdout
    assert "#   extra.scale  [3] float32" in out.read_text()


def test_yaml_to_stdout_without_output(files: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("suggest", files["ref"], files["port"])
    assert result.exit_code == 0
    path = tmp_path / "piped.yaml"
    path.write_text(result.stdout)
    assert len(Mapping.from_yaml(path).rules) == 10
    assert "every key has a partner" in result.stderr


def test_json(files: dict[str, Path]) -> None:
    result = invoke("suggest", files["ref"], files["odd"], "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.suggest/1" and data["complete"] is False
    assert data["unmatched_b"] == [{"key": "extra.scale", "what": "[3] float32"}]


def test_errors_are_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    assert_one_line_error(invoke("suggest", missing, files["port"]), "nope.pt")
    assert_one_line_error(invoke("suggest", files["ref"], files["port"], "-o", tmp_path / "no" / "m.yaml"),
                          "the output folder does not exist", "fix: create it first")
    assert_one_line_error(invoke("suggest", files["ref"], files["port"], "--top", "-1"), "--top", "fix:")
