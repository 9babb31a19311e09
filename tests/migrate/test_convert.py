"""convert and `tensorparity convert`: every format pair round-trips bitwise, nothing is overwritten
by accident, every refusal is one line naming the file, the key and the fix."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

import tensorparity
from tensorparity.checkpoint import Checkpoint, TensorEntry
from tensorparity.cli import app
from tensorparity.errors import InternalError, UsageError
from tensorparity.migrate import FORMATS, ConvertReport, convert
from tensorparity.numerics import Tolerance

runner = CliRunner(env={"COLUMNS": "160"})
EXACT = Tolerance(exact=True)
SUFFIX = {"torch": ".pt", "safetensors": ".safetensors", "safetensors-sharded": "", "dcp": "", "nemo": ".nemo"}


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"encoder.weight": torch.randn(8, 6, generator=gen), "encoder.bias": torch.randn(8, generator=gen),
            "head.weight": torch.randn(3, 8, generator=gen).bfloat16(), "steps": torch.tensor(12)}


@pytest.fixture
def nemo_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model_config.yaml").write_text(yaml.safe_dump({"target": "nemo.collections.asr.X", "encoder": {"d": 8}}))
    torch.save(_state(), src / "model_weights.ckpt")
    (src / "ff00_vocab.txt").write_text("a\nb\n")
    with tarfile.open(tmp_path / "model.nemo", "w:") as tar:
        tar.add(src, arcname=".")
    return tmp_path / "model.nemo"


@pytest.mark.parametrize("fmt", FORMATS)
def test_nemo_through_every_format_and_back_keeps_weights_and_config(tmp_path: Path, nemo_file: Path,
                                                                     fmt: str) -> None:
    middle = tmp_path / f"middle{SUFFIX[fmt]}"
    report = convert(nemo_file, middle, format=fmt, max_shard_size="200B" if "sharded" in fmt else None)
    assert report.verified is True and report.format == fmt and report.tensors == 4
    assert report.verification is not None and report.verification.verdict == "identical"
    back = tmp_path / "back.nemo"
    convert(middle, back)
    with tensorparity.open(nemo_file) as a, tensorparity.open(back) as b:
        assert b["model_config.target"].value == "nemo.collections.asr.X" and b["model_config.encoder.d"].value == 8
        weights = tensorparity.diff(a, b, tolerance=EXACT, exclude=r"^artifacts\.", weights_only=False)
        assert weights.verdict == "identical", weights.summary()
    if fmt == "nemo":  # .nemo to .nemo keeps the artifacts too
        assert tensorparity.diff(nemo_file, back, tolerance=EXACT, weights_only=False).verdict == "identical"
    elif fmt != "nemo":
        assert any("artifacts do not" in n for n in report.notes)


def test_a_lightning_checkpoint_goes_to_dcp_and_back_whole(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from tensorparity.examples.lightning_run import train_lightning

    ckpt = train_lightning(tmp_path / "run.ckpt", steps=1)
    report = convert(ckpt, tmp_path / "dcp", format="dcp")
    assert report.verified and any(n.startswith("DCP keeps no empty dicts: 8 left out (") for n in report.notes)
    convert(tmp_path / "dcp", tmp_path / "back.ckpt")
    d = tensorparity.diff(ckpt, tmp_path / "back.ckpt", tolerance=EXACT, weights_only=False)
    # everything but the empty dicts DCP cannot hold (Lightning's empty loop states, no callbacks)
    assert {k.key for k in d.only_in_a} == {"callbacks", "loops.fit_loop.state_dict", "loops.validate_loop.state_dict",
                                            "loops.test_loop.state_dict", "loops.predict_loop.state_dict",
                                            "loops.fit_loop.epoch_loop.automatic_optimization.state_dict",
                                            "loops.fit_loop.epoch_loop.manual_optimization.state_dict",
                                            "loops.fit_loop.epoch_loop.val_loop.state_dict"}
    assert not d.only_in_b and not d.values and d.tensors and all(t.status == "identical" for t in d.tensors)
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert isinstance(back["optimizer_states"], list) and "state_dict" in back
    # and the weights alone to safetensors, keyed as the model names them
    report = convert(ckpt, tmp_path / "model.safetensors", weights_only=True)
    assert report.values == 0 and any("weights only" in n for n in report.notes)
    assert set(tensorparity.open(tmp_path / "model.safetensors")) == set(tensorparity.open(ckpt).weights())


def test_the_destination_and_the_source_are_protected(tmp_path: Path) -> None:
    src = tmp_path / "w.pt"
    torch.save(_state(), src)
    before = src.read_bytes()
    with pytest.raises(UsageError, match="refusing to write the converted checkpoint over"):
        convert(src, src, overwrite=True)
    with pytest.raises(UsageError, match="refusing to write"):
        convert(src, tmp_path, format="dcp", overwrite=True)  # the folder holding the source
    convert(src, tmp_path / "dcp", format="dcp")
    with pytest.raises(UsageError, match="refusing to write"):
        convert(tmp_path / "dcp", tmp_path / "dcp" / "inside.pt")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError) as err:
        convert(src, out)
    assert err.value.fix == "pass --overwrite to replace it, or choose another path" and out.read_bytes() == b"keep me"
    convert(src, out, overwrite=True)
    assert src.read_bytes() == before and tensorparity.open(out)["steps"].load() == 12
    with pytest.raises(UsageError, match="cannot tell the output format"):
        convert(src, tmp_path / "noext")
    assert sorted(os.listdir(tmp_path)) == ["dcp", "out.safetensors", "w.pt"]


def test_a_write_that_does_not_read_back_identical_is_never_installed(tmp_path: Path) -> None:
    # A source whose tensor changes between reads (it is being rewritten while we convert).
    draws = iter(range(1000))
    entries = {"w": TensorEntry("w", (4,), torch.float32, 16, "moving", lambda: torch.full((4,), float(next(draws))))}
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(InternalError, match="does not read back identical"):
        convert(Checkpoint(source="moving", format="mapping", entries=entries), out, overwrite=True)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.safetensors"]


def test_report_prints_and_serialises(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "w.pt")
    report = convert(tmp_path / "w.pt", tmp_path / "shards", max_shard_size="100B")
    assert isinstance(report, ConvertReport) and report.format == "safetensors-sharded"
    assert report.files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json")
    data = json.loads(report.to_json())
    assert data["schema"] == "tensorparity.convert/1" and data["verified"] is True and data["tensors"] == 4
    assert data["nbytes"] == 8 * 6 * 4 + 8 * 4 + 3 * 8 * 2 + 8 == 280
    text = str(report)
    assert text.startswith("converted torch-zip -> safetensors-sharded: 4 tensors (280 B), 0 values; verified bitwise")
    assert "Only in A: 0" in text


def test_cli_converts_and_prints_json(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "w.pt")
    result = invoke("convert", tmp_path / "w.pt", tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.output
    assert "converted torch-zip -> safetensors: 4 tensors" in result.stdout and "verified bitwise" in result.stdout
    result = invoke("convert", tmp_path / "w.pt", tmp_path / "ckpt", "--format", "dcp", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["format"] == "dcp"
    result = invoke("convert", tmp_path / "w.pt", tmp_path / "s", "--max-shard-size", "100B", "--no-verify", "--json")
    assert json.loads(result.stdout)["verified"] is None
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "s", "w.pt", "w.safetensors"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "epoch": 3, "cfg": {"lr": 0.1}}, tmp_path / "train.pt")
    line = assert_one_line_error(invoke("convert", tmp_path / "train.pt", tmp_path / "w.safetensors"),
                                 "w.safetensors", "2 non-tensor value(s) cannot go into safetensors: epoch, cfg.lr",
                                 "fix: convert the weights only (--weights-only")
    assert line.startswith("error: ")
    assert_one_line_error(invoke("convert", tmp_path / "train.pt", tmp_path / "train.pt", "--overwrite"),
                          "refusing to write the converted checkpoint over (or into) an input")
    assert_one_line_error(invoke("convert", tmp_path / "missing.pt", tmp_path / "x.pt"), "missing.pt",
                          "no such file or folder")
    assert_one_line_error(invoke("convert", tmp_path / "train.pt", tmp_path / "x.pt", "--max-shard-size", "lots"),
                          "size 'lots' is not a number of bytes", "fix: write e.g. 500MB")
    assert_one_line_error(invoke("convert", tmp_path / "train.pt", tmp_path / "x.onnx"),
                          "cannot tell the output format", "--format")
    assert_one_line_error(invoke("convert", tmp_path / "train.pt", tmp_path / "x.nemo"),
                          "a .nemo needs a model_config.yaml")
    assert sorted(os.listdir(tmp_path)) == ["train.pt"]


def test_convert_through_a_mapping_and_back_on_the_command_line(tmp_path: Path) -> None:
    # one convert: the format conversion and the key mapping are one command and one function
    src = tmp_path / "a.pt"
    w = torch.arange(6.0).reshape(2, 3)
    torch.save({"w": w, "step": 7}, src)
    spec = tmp_path / "m.yaml"
    spec.write_text("name: demo\nrules:\n  - {a: w, b: weight, transform: {transpose: [0, 1]}}\n  - {a: step, b: step}\n")
    result = invoke("convert", src, tmp_path / "b.pt", "-m", spec, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["notes"][0] == "keys mapped through 'demo' (a to b)"
    with tensorparity.open(tmp_path / "b.pt") as b:
        assert torch.equal(b["weight"].load(), w.T) and b["step"].value == 7
    assert invoke("convert", tmp_path / "b.pt", tmp_path / "c.pt", "--map", spec, "--inverse").exit_code == 0
    assert tensorparity.diff(src, tmp_path / "c.pt").verdict == "identical"
    # a mapping that does not fit is one line, and nothing is written
    spec.write_text("rules:\n  - {a: w, b: weight, transform: {transpose: [0, 2]}}\n")
    assert_one_line_error(invoke("convert", src, tmp_path / "d.pt", "-m", spec), "transpose dims 0 and 2")
    assert not (tmp_path / "d.pt").exists()
