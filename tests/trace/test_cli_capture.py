"""`tensorparity capture`: reproducible inputs from a spec or a function, checkpoints, modes,
losses, and the one-line error contract (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.cli import app
from tensorparity.examples import port_model, reference_model
from tensorparity.trace.seed import InputSpec, input_hash

runner = CliRunner(env={"COLUMNS": "160"})
REF = "tensorparity.examples:reference_model"


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, ["capture", *(str(a) for a in args)])


def test_capture_with_an_input_spec(tmp_path: Path) -> None:
    result = invoke(REF, "-o", tmp_path / "t", "--input-spec", "2x16x20:float32", "--seed", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (f"captured 133 records of 28 layers and 38 parameters (ReferenceModel, mode full, "
                        f"forward + backward) -> {tmp_path / 't'}")
    assert lines[1].startswith("  stored: 133 tensors, ") and lines[1].endswith(" KiB in 1 shard; statistics only: 0")
    x = InputSpec.parse("2x16x20:float32", seed=3).build()
    assert lines[2] == f"  input: 2x16x20:float32:seed=3 (hash {input_hash(x)})"
    trace = Trace.open(tmp_path / "t")
    assert torch.equal(trace.inputs()[0][0], x)
    prov = trace.provenance
    assert (prov["seed"], prov["factory"], prov["training"], prov["loss"]) == (3, REF, False, "output.float().sum()")
    assert prov["deterministic"] is True
    # The model was built under the seed too: its output is the reference model's on that input.
    model = reference_model()
    assert torch.equal(trace.load("<model>/0/model_output"), model(x).detach())


def test_same_command_twice_gives_the_same_trace(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert invoke(REF, "-o", tmp_path / name, "--input-spec", "2x16x20:float32").exit_code == 0
    a, b = Trace.open(tmp_path / "a"), Trace.open(tmp_path / "b")
    assert a.records == b.records
    assert all(torch.equal(a.load(r), b.load(r)) for r in a.records if r.stored)


def test_modes_and_no_backward(tmp_path: Path) -> None:
    result = invoke(REF, "-o", tmp_path / "s", "--input-spec", "2x16x20", "--mode", "stats", "--no-backward")
    assert result.exit_code == 0, result.output
    assert "mode stats, forward only" in result.stdout
    trace = Trace.open(tmp_path / "s")
    assert {r.kind for r in trace.records} == {"model_input", "output", "model_output", "param", "param_signature"}
    assert {r.kind for r in trace.records if r.stored} == {"model_input", "param_signature"}
    result = invoke(REF, "-o", tmp_path / "w", "--input-spec", "2x16x20", "--mode", "window",
                    "--window", r"^layers\.1\.ffn$", "--include", r"^layers\.1", "--exclude", "proj")
    assert result.exit_code == 0, result.output
    trace = Trace.open(tmp_path / "w")
    assert {r.module for r in trace.records if r.stored and r.kind != "param_signature"} == {"", "layers.1.ffn"}
    assert not any("proj" in r.module for r in trace.records)


def test_checkpoint_weights_are_loaded_and_hashed(tmp_path: Path) -> None:
    state = reference_model(seed=5).state_dict()
    torch.save(state, tmp_path / "ref.pt")
    result = invoke(REF, "-o", tmp_path / "t", "--input-spec", "2x16x20", "--checkpoint", tmp_path / "ref.pt")
    assert result.exit_code == 0, result.output
    trace = Trace.open(tmp_path / "t")
    assert trace.provenance["checkpoint_hash"] == input_hash(state)
    assert f"checkpoint hash {input_hash(state)}" in result.stdout
    model = reference_model(seed=5)
    x = trace.inputs()[0][0]
    assert torch.equal(trace.load("<model>/0/model_output"), model(x).detach())


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    torch.save(port_model().state_dict(), tmp_path / "port.pt")
    result = invoke(REF, "-o", tmp_path / "t", "--input-spec", "2x16x20", "--checkpoint", tmp_path / "port.pt")
    assert_one_line_error(result, "the checkpoint does not load into the model: ", "missing keys (e.g. ",
                          "fix: run `tensorparity load-check CKPT MODEL`")
    assert not (tmp_path / "t").exists()


def test_input_and_loss_functions_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "inputs.py").write_text(
        "import torch\n"
        "def make_input():\n"
        "    return {'features': torch.ones(1, 16, 8)}\n"
        "def loss(output):\n"
        "    return output.pow(2).mean()\n")
    result = invoke(REF, "-o", tmp_path / "t", "--input", f"{tmp_path / 'inputs.py'}:make_input",
                    "--loss", f"{tmp_path / 'inputs.py'}:loss")
    assert result.exit_code == 0, result.output
    trace = Trace.open(tmp_path / "t")
    assert [r.key for r in trace.select(kind="model_input")] == ["<model>/0/model_input/features"]
    args, kwargs = trace.inputs()
    assert args == () and torch.equal(kwargs["features"], torch.ones(1, 16, 8))
    out = trace.load("<model>/0/model_output")
    expected = 2 * out / out.numel()  # d(mean(y^2))/dy
    assert torch.allclose(trace.load("<model>/0/grad_output"), expected)
    assert trace.provenance["input_hash"] == input_hash(features=torch.ones(1, 16, 8))


@pytest.mark.parametrize(("args", "needles"), [
    ([], ["give the model's input: --input-spec", "fix: e.g. --input-spec 2x16x20:float32"]),
    (["--input-spec", "2x3", "--input", "m:f"], ["give the model's input"]),
    (["--input-spec", "2xx3"], ["is not a shape like 2x16x20", "fix: write SHAPE[:DTYPE]"]),
    (["--input-spec", "2x16x20", "--mode", "fast"], ["--mode 'fast' is not one of full, stats, window"]),
    (["--input-spec", "2x16x20", "--mode", "window"], ["--mode window and --window REGEX go together",
                                                       "fix: pass e.g. --mode window --window"]),
    (["--input-spec", "2x16x20", "--window", "x"], ["--mode window and --window REGEX go together"]),
    (["--input-spec", "2x16x20", "--include", "("], ["include '(' is not a regular expression"]),
    (["--input-spec", "2x16x20", "--input", "nosuchpkg_xyz:f"], ["give the model's input"]),
])
def test_usage_errors(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(invoke(REF, "-o", tmp_path / "t", *args), *needles)
    assert not (tmp_path / "t").exists()


def test_bad_factory_non_empty_folder_and_failing_model(tmp_path: Path) -> None:
    assert_one_line_error(invoke("nosuchpkg_xyz:build", "-o", tmp_path / "t", "--input-spec", "2x3"),
                          "package 'nosuchpkg_xyz' is not installed")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    for extra in ([], ["--overwrite"]):  # a folder that is not a trace: never, even with --overwrite
        assert_one_line_error(invoke(REF, "-o", tmp_path / "full", "--input-spec", "2x16x20", *extra),
                              "exists and is not a trace", "fix: choose a new folder")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    # The reference model wants 16 input channels: a wrong input fails inside the model.
    line = assert_one_line_error(invoke(REF, "-o", tmp_path / "t", "--input-spec", "2x5x20"),
                                 "the model raised RuntimeError during forward",
                                 "fix: run the model on this input in Python")
    assert line.startswith("error: ")
    assert not (tmp_path / "t").exists()  # no half-written trace is left behind


def test_an_existing_trace_is_replaced_only_with_overwrite_and_atomically(tmp_path: Path) -> None:
    from tensorparity.checkpoint.tracefolder.reader import Trace

    out = tmp_path / "t"
    assert invoke(REF, "-o", out, "--input-spec", "2x16x20").exit_code == 0
    first = (out / "manifest.json").read_bytes()
    assert_one_line_error(invoke(REF, "-o", out, "--input-spec", "2x16x20:seed=5"),
                          "the output folder exists and holds a trace", "pass --overwrite")
    assert (out / "manifest.json").read_bytes() == first
    replaced = invoke(REF, "-o", out, "--input-spec", "2x16x20:seed=5", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert Trace.open(out).provenance["input_spec"] == ["2x16x20:float32:seed=5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # nothing left beside it
    # a failing run with --overwrite leaves the old trace as it was
    before = (out / "manifest.json").read_bytes()
    assert_one_line_error(invoke(REF, "-o", out, "--input-spec", "2x5x20", "--overwrite"), "the model raised")
    assert (out / "manifest.json").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    # the checkpoint the model loads may not lie in the folder being replaced
    import torch

    from tensorparity.examples import reference_model

    torch.save(reference_model().state_dict(), out / "weights.pt")
    assert_one_line_error(invoke(REF, "-o", out, "--input-spec", "2x16x20", "--checkpoint", out / "weights.pt",
                                 "--overwrite"), "refusing to write the trace over (or into) an input")


def test_the_output_option_has_the_common_name_and_keeps_the_old_one(tmp_path: Path) -> None:
    for flag in ("--output", "--out"):
        result = invoke(REF, flag, tmp_path / flag.strip("-"), "--input-spec", "2x16x20")
        assert result.exit_code == 0, result.output
        assert (tmp_path / flag.strip("-") / "manifest.json").is_file()
