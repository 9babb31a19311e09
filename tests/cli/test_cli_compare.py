"""`tensorparity compare A B`: exit codes (0 same, 1 differs, 2 error), --map, --align, tolerance
options, --json, folding, the one-line error contract, and a trace captured in another process
giving the report of an in-process compare."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import typer
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity.examples import port_model, reference_model
from tensorparity.trace import capture
from tensorparity.trace._compare import compare_traces

runner = CliRunner(env={"COLUMNS": "160"})
MAP = Path(str(files("tensorparity.examples") / "reference_to_port.yaml"))

# What a second environment runs: capture one model on the shared input, write the trace folder.
CAPTURE = """
import sys, torch
from tensorparity.examples import port_model, reference_model
from tensorparity.trace import capture
which, out = sys.argv[1], sys.argv[2]
model = reference_model() if which == "reference" else port_model()
if which == "broken":
    model.blocks[1].attn_norm.eps = 0.1
x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
with capture(model, out=out):
    model(x).sum().backward()
"""


def app() -> typer.Typer:
    from tensorparity.cli import app as main_app

    return main_app


def invoke(*args: str | Path) -> object:
    return runner.invoke(app(), ["compare", *(str(a) for a in args)])


def capture_to(folder: Path, which: str) -> Path:
    model = reference_model() if which == "reference" else port_model()
    if which == "broken":
        model.blocks[1].attn_norm.eps = 0.1
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    with capture(model, out=folder):
        model(x).sum().backward()
    return folder


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("traces")
    return {name: capture_to(root / name, which) for name, which in
            (("ref", "reference"), ("ref2", "reference"), ("port", "port"), ("broken", "broken"))}


def test_identical_traces_exit_0(traces: dict[str, Path]) -> None:
    result = invoke(traces["ref"], traces["ref2"])
    assert result.exit_code == 0, result.output
    assert "→ identical" in result.stdout and "Common layers: 28 / Only in A: 0 / Only in B: 0" in result.stdout
    assert "First divergence" not in result.stdout


def test_a_port_matches_through_the_mapping_and_by_order(traces: dict[str, Path]) -> None:
    for extra, counts in ((["--map", MAP], "18 / Only in A: 6 / Only in B: 0 / Matched: 18"),
                          (["--align", "order"], "16 / Only in A: 12 / Only in B: 2 / Matched: 16")):
        result = invoke(traces["ref"], traces["port"], *extra)
        assert result.exit_code == 0, result.output
        assert f"Common layers: {counts} / Mismatched: 0" in result.stdout


def test_a_broken_port_exits_1_and_names_the_first_divergence(traces: dict[str, Path]) -> None:
    result = invoke(traces["ref"], traces["broken"], "--map", MAP, "--top", "2")
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "First divergence (forward): layers.1.norm1 → blocks.1.attn_norm  (LayerNorm)" in out
    assert "the error is introduced here" in out
    # The fused qkv groups are compared now (through the layout); both inherit the error.
    assert "Mismatched layers, in execution order (18); inherited: from layers.1.norm1 unless named" in out
    assert "… and 16 more" in out
    # A tolerance wide enough for the bug turns the verdict; --tol loosens single record kinds.
    assert invoke(traces["ref"], traces["broken"], "--map", MAP, "--atol", "10").exit_code == 0
    narrow = invoke(traces["ref"], traces["broken"], "--map", MAP, "--atol", "10", "--tol", "/param_grad/=0")
    assert narrow.exit_code == 1 and "Parameter gradients outside tolerance" in narrow.stdout


def test_json_is_the_library_report(traces: dict[str, Path]) -> None:
    result = invoke(traces["ref"], traces["broken"], "--align", "order", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema"] == "tensorparity.trace-compare/1" and data["alignment"]["method"] == "order"
    assert data["first_divergence"]["layer_b"] == "blocks.1.attn_norm"
    assert data == json.loads(compare_traces(traces["ref"], traces["broken"], align="order").to_json())


def test_errors_are_one_line_with_a_fix(traces: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(invoke(tmp_path / "nowhere", traces["ref"]), "error:", "nowhere", "; fix: ")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke(traces["ref"], tmp_path / "empty"), "not a trace", "fix: pass a folder written by")
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--align", "fuzzy"), "fix: pass align='auto'")
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--top", "-1"), "fix: pass e.g. --top 20")
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--margin", "0.5"), "fix: pass e.g. margin=10")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{a: 'x.{p}'}]\n")
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--map", bad), "bad.yaml:1", "the rule has no b",
                          "fix: give b")


def test_a_trace_captured_in_another_process_gives_the_in_process_report(tmp_path: Path) -> None:
    for which in ("reference", "broken"):
        subprocess.run([sys.executable, "-c", CAPTURE, which, str(tmp_path / which)], check=True, timeout=300)
    here = {which: capture_to(tmp_path / f"here-{which}", which) for which in ("reference", "broken")}
    other = json.loads(invoke(tmp_path / "reference", tmp_path / "broken", "--map", MAP, "--json").stdout)
    local = json.loads(compare_traces(here["reference"], here["broken"], mapping=MAP).to_json())
    for data in (other, local):
        for side in ("a", "b"):
            data.pop(side)  # where the traces are, and when and by which command line they were made
    assert other == local
    assert other["first_divergence"]["layer_a"] == "layers.1.norm1" and other["verdict"] == "differs"


def test_b_can_be_a_live_model_factory_run_on_the_trace_input(tmp_path: Path) -> None:
    ref = capture_to(tmp_path / "ref", "reference")
    same = invoke(ref, "tensorparity.examples:port_model", "--map", MAP, "--json")
    assert same.exit_code == 0, same.output
    data = json.loads(same.stdout)
    assert data["verdict"] in ("identical", "close") and data["b"]["model_class"].endswith("PortModel")
    (tmp_path / "eps_port.py").write_text("from tensorparity.examples import port_model\n"
                                        "def broken():\n    m = port_model()\n    m.blocks[1].attn_norm.eps = 0.1\n"
                                        "    return m\n")
    differs = invoke(ref, f"{tmp_path / 'eps_port.py'}:broken", "--map", MAP)
    assert differs.exit_code == 1 and "First divergence (forward): layers.1.norm1 → blocks.1.attn_norm" in differs.stdout
    assert_one_line_error(invoke(ref, "tensorparity.examples:no_such_factory"), "no_such_factory", "fix:")


def test_noise_floor_recorded_at_capture_judges_each_layer(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    done = runner.invoke(app(), ["capture", "tensorparity.examples:reference_model", "-o", str(ref),
                                 "--input-spec", "2x16x12:float32", "--inputs", "--noise-floor"])
    assert done.exit_code == 0, done.output
    floor = json.loads((ref / "manifest.json").read_text())["provenance"]["noise_floor"]
    assert floor["factor"] == 3 and 0 < floor["atols"]["layers.1.norm2/0/output"] < 1e-4
    same = invoke(ref, "tensorparity.examples:port_model", "--map", MAP, "--noise-floor", "--json")
    assert same.exit_code == 0, same.output
    data = json.loads(same.stdout)
    assert data["tolerance"]["description"].endswith("per-key override(s)")
    (tmp_path / "gelu_port.py").write_text("from tensorparity.examples import port_model\n"
                                           "def build():\n    return port_model(bug='gelu_tanh')\n")
    differs = invoke(ref, f"{tmp_path / 'gelu_port.py'}:build", "--map", MAP, "--noise-floor")
    assert differs.exit_code == 1 and "First divergence (forward): layers.0 → blocks.0" in differs.stdout
    plain = capture_to(tmp_path / "plain", "reference")
    assert_one_line_error(invoke(plain, "tensorparity.examples:port_model", "--noise-floor"),
                          "holds no measured noise floor", "fix: capture it with tensorparity capture ... --noise-floor")


def test_measuring_the_noise_floor_leaves_the_model_gradients_alone() -> None:
    from tensorparity.trace.noise import noise_atols

    model = reference_model()
    x = torch.randn(1, 16, 12)
    model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    atols = noise_atols(model, x, loss=lambda out: out.sum())
    assert any("/param_grad/" in k for k in atols)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_save_map_writes_the_mapping_found_and_never_an_existing_file_or_an_input(traces: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    from tensorparity.mapping import Mapping

    out = tmp_path / "found.yaml"
    result = invoke(traces["ref"], traces["port"], "--save-map", out)
    assert result.exit_code == 0, result.output
    assert "found one from the traces' parameters" in result.stdout
    found = Mapping.from_yaml(out)
    assert any(len(r.a) == 3 and r.b == ("blocks.{i}.qkv.{p}",) for r in found.rules)
    before = out.read_bytes()
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--save-map", out), "the output file exists",
                          "fix: pass --overwrite")
    assert out.read_bytes() == before
    assert invoke(traces["ref"], traces["port"], "--save-map", out, "--overwrite").exit_code == 0
    manifest = traces["ref"] / "manifest.json"
    kept = manifest.read_bytes()
    assert_one_line_error(invoke(traces["ref"], traces["port"], "--save-map", manifest, "--overwrite"),
                          "refusing to write the mapping over (or into) an input", "fix:")
    assert manifest.read_bytes() == kept
    # a mapping given: nothing is found, nothing written, and stderr says so
    given = tmp_path / "given.yaml"
    result = invoke(traces["ref"], traces["port"], "--map", MAP, "--save-map", given)
    assert result.exit_code == 0 and not given.exists() and "no mapping was found to save" in result.stderr
