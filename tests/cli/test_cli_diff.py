"""`tensorparity diff`: exit codes (0 same, 1 differs, 2 error), tolerance options, --json, --map,
and the one-line error contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from _cli_helpers import assert_one_line_error

runner = CliRunner(env={"COLUMNS": "160"})
MAP = Path(tensorparity.__file__).parent / "examples" / "reference_to_port.yaml"


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The same weights as torch.save and safetensors files, plus nudged, broken and NaN copies."""
    torch.manual_seed(0)
    state = {f"layers.{i}.w": torch.randn(6, 6) for i in range(4)} | {"head.b": torch.randn(3)}
    out = {"pt": tmp_path / "a.pt", "st": tmp_path / "a.safetensors"}
    torch.save(state, out["pt"])
    save_file(state, str(out["st"]))
    ulp = dict(state)
    ulp["head.b"] = torch.nextafter(state["head.b"], torch.full((3,), math.inf))
    broken = dict(state)
    broken["layers.2.w"] = state["layers.2.w"].clone()
    broken["layers.2.w"][1, 4] = 7.0
    loose = {k: v + 1e-3 if k == "head.b" else v for k, v in state.items()}
    nan = dict(state)
    nan["head.b"] = torch.tensor([math.nan, 1.0, 2.0])
    nan2 = dict(nan)
    nan2["head.b"] = torch.tensor([math.nan, 1.0, 2.0000002])
    for name, obj in (("ulp", ulp), ("broken", broken), ("loose", loose), ("nan", nan), ("nan2", nan2)):
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(obj, str(out[name]))
    out["ckpt"] = tmp_path / "run.ckpt"
    torch.save({"epoch": 1, "global_step": 3, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"lr": 0.1}}, out["ckpt"])
    return out


def test_identical_exits_0(files: dict[str, Path]) -> None:
    result = invoke("diff", files["pt"], files["st"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert ("Common keys: 5 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / Value mismatches: 0 → identical"
            in result.stdout)


def test_broken_weight_exits_1_and_names_it(files: dict[str, Path]) -> None:
    result = invoke("diff", files["pt"], files["broken"])
    assert result.exit_code == 1
    out = result.stdout
    assert "Value mismatches: 1 → differs" in out
    assert "layers.2.w  [6, 6] float32" in out and "first at [1, 4]: A" in out and "vs B 7 ·" in out


def test_json_only_json_on_stdout(files: dict[str, Path]) -> None:
    result = invoke("diff", files["pt"], files["broken"], "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.diff/1" and data["verdict"] == "differs" and data["exit_code"] == 1
    (bad,) = [t for t in data["tensors"] if not t["passed"]]
    assert bad["key"] == "layers.2.w" and bad["first_index"] == [1, 4] and bad["first_b"] == 7.0


def test_exact_and_default_on_one_ulp(files: dict[str, Path]) -> None:
    assert invoke("diff", files["st"], files["ulp"]).exit_code == 0
    exact = invoke("diff", files["st"], files["ulp"], "--exact")
    assert exact.exit_code == 1 and "outside exact (bitwise)" in exact.stdout


def test_atol_rtol_statistic_and_per_key_override(files: dict[str, Path]) -> None:
    assert invoke("diff", files["st"], files["loose"]).exit_code == 1
    assert invoke("diff", files["st"], files["loose"], "--atol", "2e-3").exit_code == 0
    assert invoke("diff", files["st"], files["loose"], "--rtol", "1").exit_code == 0
    assert invoke("diff", files["st"], files["loose"], "--tol", r"^head\.=2e-3").exit_code == 0
    assert invoke("diff", files["st"], files["loose"], "--tol", r"^layers\.=2e-3").exit_code == 1
    mean = invoke("diff", files["st"], files["loose"], "--statistic", "mean", "--atol", "1e-3", "--rtol", "0")
    assert mean.exit_code == 0 and "statistic=mean" in mean.stdout


def test_nan_unequal(files: dict[str, Path]) -> None:
    assert invoke("diff", files["nan"], files["nan2"]).exit_code == 0
    strict = invoke("diff", files["nan"], files["nan2"], "--nan-unequal")
    assert strict.exit_code == 1 and "NaN != NaN" in strict.stdout


def test_weights_only_and_all_keys(files: dict[str, Path]) -> None:
    auto = invoke("diff", files["ckpt"], files["st"])
    assert auto.exit_code == 0 and "model weights only, prefix 'state_dict.' removed" in " ".join(auto.stdout.split())
    every = invoke("diff", files["ckpt"], files["st"], "--all-keys")
    assert every.exit_code == 1 and "Common keys: 0 /" in every.stdout
    assert invoke("diff", files["ckpt"], files["ckpt"], "--weights-only", "--json").exit_code == 0


def test_include_exclude_and_top(files: dict[str, Path]) -> None:
    assert invoke("diff", files["pt"], files["broken"], "--exclude", r"layers\.2\.").exit_code == 0
    assert invoke("diff", files["pt"], files["broken"], "--include", "head").exit_code == 0
    many = invoke("diff", files["st"], files["loose"], "--atol", "0", "--rtol", "0", "--tol", "x=0", "--top", "0")
    assert many.exit_code == 1 and "… and 1 more (--top N shows more, --json lists all)" in many.stdout


def test_reference_vs_port_through_the_mapping(tmp_path: Path) -> None:
    from tensorparity.examples import port_model, reference_model

    ref = tmp_path / "reference.pt"
    torch.save(reference_model().state_dict(), ref)
    port = {k: v.detach().clone() for k, v in port_model().state_dict().items()}
    save_file(port, str(tmp_path / "port.safetensors"))
    ok = invoke("diff", ref, tmp_path / "port.safetensors", "--map", MAP)
    assert ok.exit_code == 0, ok.output
    assert "→ identical" in ok.stdout and "reference-to-port" in ok.stdout
    port["blocks.0.fc1.bias"][5] += 1.0
    save_file(port, str(tmp_path / "port_broken.safetensors"))
    bad = invoke("diff", ref, tmp_path / "port_broken.safetensors", "--map", MAP)
    assert bad.exit_code == 1 and "blocks.0.fc1.bias  [128] float32" in bad.stdout
    assert "made from A's layers.0.ffn.0.bias" in bad.stdout


@pytest.mark.parametrize(("args", "needles"), [
    (["--include", "layers.("], ["error: include filter 'layers.(' is not a valid regular expression",
                                 r"fix: escape special characters"]),
    (["--tol", "head=abc"], ["--tol 'head=abc': atol 'abc' is not a number >= 0", "fix: write --tol 'REGEX=ATOL'"]),
    (["--tol", "head"], ["--tol 'head' is not REGEX=ATOL[,RTOL]", "fix: write e.g."]),
    (["--tol", "head=1,2,3"], ["has 3 numbers after '='", "fix: give ATOL or ATOL,RTOL"]),
    (["--statistic", "median"], ["--statistic 'median' is not one of elementwise, max, mean",
                                 "fix: pass --statistic elementwise"]),
    (["--exact", "--atol", "1e-3"], ["--exact compares bytes", "fix: drop --atol/--rtol"]),
    (["--atol", "-1"], ["invalid tolerance: atol=-1.0 must be a number >= 0", "fix: use non-negative"]),
    (["--top", "-1"], ["--top must be 0 or more", "fix: pass e.g. --top 20"]),
])
def test_bad_options_are_one_line_errors(files: dict[str, Path], args: list[str], needles: list[str]) -> None:
    assert_one_line_error(invoke("diff", files["pt"], files["st"], *args), *needles)


def test_bad_inputs_are_one_line_errors(files: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(invoke("diff", files["pt"], tmp_path / "nope.pt"),
                          "nope.pt: no such file or folder", "fix: check the path")
    bad_map = tmp_path / "bad.yaml"
    bad_map.write_text("version: 1\nrules:\n  - {a: 'x.{p}', b: 'y.{p}', trasform: {transpose: [0, 1]}}\n"
                       "  - {a: 'x.{q}', b: 'z.{q}'}\n")
    line = assert_one_line_error(invoke("diff", files["pt"], files["st"], "--map", bad_map),
                                 "bad.yaml", "nothing was compared", "trasform")
    assert line.startswith("error: ")


def test_python_dash_m_exit_codes(files: dict[str, Path]) -> None:
    env = {**os.environ, "COLUMNS": "120"}

    def run(*args: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tensorparity", "diff", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=120)

    assert run(files["pt"], files["st"], "--json").returncode == 0
    differs = run(files["pt"], files["broken"])
    assert differs.returncode == 1 and "→ differs" in differs.stdout and differs.stderr == ""


def test_classic_line_is_never_broken_on_a_narrow_terminal(files: dict[str, Path]) -> None:
    result = CliRunner(env={"COLUMNS": "50"}).invoke(app, ["diff", str(files["pt"]), str(files["st"])])
    assert result.exit_code == 0
    assert ("Common keys: 5 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / Value mismatches: 0 → identical\n"
            in result.stdout)
