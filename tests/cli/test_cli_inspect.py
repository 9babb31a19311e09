"""`tensorparity inspect`: output, options, exit codes and the one-line error contract."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from _cli_helpers import assert_one_line_error

runner = CliRunner(env={"COLUMNS": "160"})


@dataclasses.dataclass
class RunConfig:
    seed: int = 7


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A Lightning-shaped training checkpoint with 12 identical layers, written by torch.save."""
    torch.manual_seed(0)
    state = {}
    for i in range(12):
        state[f"model.layers.{i}.linear.weight"] = torch.randn(6, 6)
        state[f"model.layers.{i}.linear.bias"] = torch.randn(6)
    state["model.head.weight"] = torch.randn(3, 6, dtype=torch.bfloat16)
    path = tmp_path / "tiny.ckpt"
    torch.save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"lr": 0.01}}, path)
    return path


def invoke(*args: str | Path, **env: str) -> object:
    return runner.invoke(app, [str(a) for a in args], env=env or None)


def test_inspect_shows_sections_dtypes_largest_and_folded_tree(ckpt: Path) -> None:
    result = invoke("inspect", ckpt, "--top", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert result.stderr == ""
    assert "lightning 2.4.0" in out and "global_step" in out
    assert "Sections" in out and "Dtypes" in out and "bfloat16" in out
    largest = out[out.index("Largest tensors"):out.index("Keys (")]
    assert largest.count("model.layers.") == 2 and "linear.weight" in largest  # [6, 6] tensors lead
    assert "{0..11}" in out and "×12" in out
    assert "model.layers.5" not in out.split("Keys (")[1]


def test_all_unfolds(ckpt: Path) -> None:
    out = invoke("inspect", ckpt, "--all").stdout
    tree = out.split("Keys (")[1]
    assert "{0..11}" not in tree
    assert all(f"── {i}.linear" in tree for i in range(12))


def test_keys_filter(ckpt: Path) -> None:
    result = invoke("inspect", ckpt, "--keys", r"layers\.1[01]\.")
    assert result.exit_code == 0
    tree = result.stdout.split("Keys matching")[1]
    assert "(4 of 29)" in tree
    assert "{10..11}" in tree and "head" not in tree


def test_json_only_json_on_stdout(ckpt: Path) -> None:
    result = invoke("inspect", ckpt, "--json", "-k", "head")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.inspect/1"
    assert [k["key"] for k in data["keys"]] == ["state_dict.model.head.weight"]
    assert data["totals"]["tensors"] == 25
    assert data["provenance"]["global_step"] == 40


def test_placeholder_panel(tmp_path: Path) -> None:
    path = tmp_path / "cfg.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": RunConfig()}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 0
    assert "Not executed (1)" in result.stdout
    assert "RunConfig() with state {'seed': 7}" in result.stdout


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(invoke("inspect", tmp_path / "nope.ckpt"),
                          "error: ", "nope.ckpt: no such file or folder", "fix: check the path")


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n")
    assert_one_line_error(invoke("inspect", path), "error: ", "notes.txt: unrecognised file format",
                          "fix: pass a checkpoint written by torch.save")


def test_bad_regex(ckpt: Path) -> None:
    assert_one_line_error(invoke("inspect", ckpt, "--keys", "layers.(0"),
                          "error: keys filter 'layers.(0' is not a valid regular expression",
                          r"fix: escape special characters with a backslash, e.g. 'layers\.0\.'")


def test_negative_top(ckpt: Path) -> None:
    assert_one_line_error(invoke("inspect", ckpt, "--top", "-3"), "top must be a non-negative integer",
                          "fix: pass 0 or more")


def test_internal_error_is_one_line_unless_debugging(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("tensorparity.inspect", broken)  # the command calls the public function
    line = assert_one_line_error(invoke("inspect", ckpt))
    assert line == ("internal error: RuntimeError: boom second line "
                    "(please report; set TENSORPARITY_DEBUG=1 for the traceback)")
    debug = invoke("inspect", ckpt, TENSORPARITY_DEBUG="1")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "internal error" in debug.stderr


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"tensorparity {tensorparity.__version__}"


def test_python_dash_m(tmp_path: Path, ckpt: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    ok = subprocess.run([sys.executable, "-m", "tensorparity", "inspect", str(ckpt), "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["format"] == "lightning"
    bad = subprocess.run([sys.executable, "-m", "tensorparity", "inspect", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"error: {tmp_path / 'missing.pt'}: no such file or folder; fix: check the path"]
