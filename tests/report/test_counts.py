"""Counts that say what they count: parameters, buffers and trainable as torch counts them where the
module is known or the file tells them apart, tensor elements where it does not. Fixtures are real
modules, saved by torch.save and safetensors, and a .nemo laid out as NeMo's save_to writes it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

import tensorparity
from tensorparity.checkpoint import inspect
from tensorparity.checks._loadcheck import load_check
from tensorparity.examples.formats import write_nemo


class ConvBN(nn.Module):
    """A conv block with BatchNorm (running_mean, running_var, num_batches_tracked) and a frozen stem."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv1d(3, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)
        self.stem.weight.requires_grad_(False)


class Featurizer(nn.Module):
    """NeMo's FilterbankFeatures keeps its STFT window and mel filterbank as buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(32))
        self.register_buffer("fb", torch.rand(1, 8, 17))


class Preprocessor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.featurizer = Featurizer()


class TinyASR(nn.Module):
    """The shape of a NeMo CTC model: preprocessor (buffers only), encoder with BatchNorm, decoder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.preprocessor = Preprocessor()
        self.encoder = nn.Sequential(nn.Conv1d(8, 16, 3), nn.BatchNorm1d(16), nn.ReLU())
        self.decoder = nn.Conv1d(16, 5, 1)


NEMO_CONFIG = {
    "target": "nemo.collections.asr.models.ctc_models.EncDecCTCModel",
    "nemo_version": "1.23.0",
    "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                     "features": 8, "n_fft": 32},
    "encoder": {"_target_": "nemo.collections.asr.modules.ConvASREncoder", "feat_in": 8},
    "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "num_classes": 4},
}


def torch_counts(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, buffers, trainable), as torch counts them."""
    return (sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def wide(report: Any) -> str:
    """The report as the terminal shows it, on a console wide enough for temporary paths."""
    console = Console(width=400, record=True, file=io.StringIO())
    report.render(console)
    return console.export_text()


def sections_header(text: str) -> str:
    lines = text.splitlines()
    return lines[lines.index(next(line for line in lines if line.startswith("Sections"))) + 1]


def test_a_live_module_is_counted_as_torch_counts_it() -> None:
    model = ConvBN()
    params, buffers, trainable = torch_counts(model)
    assert (params, buffers) == (132, 17)  # the counts the test stands on, worked by hand
    report = inspect(model)
    t = report.totals
    assert (t.parameters, t.buffers, t.trainable, t.elements) == (params, buffers, trainable, params + buffers)
    assert report.counted_by == "module"
    assert repr(report).endswith(f"9 tensors, {params:,} parameters, {buffers:,} buffer elements, 600 B>")
    assert sections_header(str(report)).split() == ["section", "tensors", "elements", "parameters", "buffers",
                                                     "bytes", "values", "trainable"]
    data = json.loads(report.to_json())["totals"]
    assert (data["elements"], data["parameters"], data["buffers"], data["trainable_parameters"]) == (
        params + buffers, params, buffers, trainable)
    # The same counts through tensorparity.inspect, the public name.
    assert tensorparity.inspect(model).totals == t


def test_a_module_with_shared_weights_counts_each_parameter_once() -> None:
    tied = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    tied[1].weight = tied[0].weight
    report = inspect(tied)
    assert report.totals.parameters == 12 == sum(p.numel() for p in tied.parameters())
    assert report.totals.elements == 24  # the state dict holds the shared tensor under both keys


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_saved_state_dict_names_its_batchnorm_statistics_buffers(tmp_path: Path, fmt: str) -> None:
    model = ConvBN()
    params, buffers, _ = torch_counts(model)
    path = tmp_path / ("m.pt" if fmt == "torch" else "m.safetensors")
    if fmt == "torch":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), str(path))
    report = inspect(path)
    assert (report.totals.parameters, report.totals.buffers) == (params, buffers)
    assert report.totals.trainable is None  # a state dict does not keep requires_grad
    assert report.counted_by == "names"
    assert sorted(report.buffer_keys) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert any("BatchNorm running statistics" in n for n in report.notes)
    assert f"{params:,} parameters, {buffers:,} buffer elements" in repr(report)


def test_a_file_that_cannot_tell_says_elements(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    report = inspect(path)
    assert report.totals.elements == 56 and report.totals.parameters is None and report.counted_by is None
    assert sections_header(str(report)).split() == ["section", "tensors", "elements", "bytes", "values"]
    assert "parameters" not in json.loads(report.to_json())["totals"]
    assert repr(report).endswith(": 4 tensors, 56 elements, 224 B>")


def test_a_file_of_saved_parameters_tells_them_from_buffers(tmp_path: Path) -> None:
    model = ConvBN()
    params, buffers, trainable = torch_counts(model)
    path = tmp_path / "vars.pt"
    torch.save(model.state_dict(keep_vars=True), path)  # nn.Parameter kept, requires_grad with it
    report = inspect(path)
    t = report.totals
    assert (t.parameters, t.buffers, t.trainable) == (params, buffers, trainable)
    assert report.counted_by == "saved parameters"


def test_a_nemo_whose_config_names_its_preprocessor(tmp_path: Path) -> None:
    model = TinyASR()
    params, buffers, _ = torch_counts(model)
    path = write_nemo(tmp_path / "asr.nemo", model.state_dict(), NEMO_CONFIG)
    report = inspect(path)
    assert report.format == "nemo"
    assert (report.totals.parameters, report.totals.buffers) == (params, buffers)
    assert report.totals.elements == params + buffers
    assert report.buffer_keys["preprocessor.featurizer.window"].startswith("AudioToMelSpectrogramPreprocessor")
    assert "preprocessor.featurizer.fb" in report.buffer_keys
    assert "encoder.1.running_var" in report.buffer_keys
    sections = {s.name: s for s in report.sections}
    assert sections["config"].parameters is None and sections["model"].parameters == params

    # Without the preprocessor's class, its window and filterbank are not known to be buffers:
    # the BatchNorm statistics still are, and the note says a buffer of another name is counted
    # as a parameter.
    anonymous = {k: v for k, v in NEMO_CONFIG.items() if k != "preprocessor"}
    blind = inspect(write_nemo(tmp_path / "blind.nemo", model.state_dict(), anonymous))
    featurizer = 32 + 8 * 17
    assert blind.totals.buffers == buffers - featurizer
    assert any("a buffer of another name is counted as a parameter" in n for n in blind.notes)


def test_diff_header_counts_elements(tmp_path: Path) -> None:
    state = nn.Linear(3, 2).state_dict()
    a, b = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(state, a)
    save_file(state, str(b))
    report = tensorparity.diff(a, b)
    text = wide(report)
    assert "a.pt  (torch-zip, 2 tensors, 8 elements)" in text
    assert "b.safetensors  (safetensors, 2 tensors, 8 elements)" in text
    assert " parameters)" not in text and "params" not in text
    data = json.loads(report.to_json())
    assert data["a"]["elements"] == 8 and "parameters" not in data["a"]
    assert data["sections"][0]["elements_a"] == 8
    live = wide(tensorparity.diff(nn.Linear(3, 2), nn.Linear(3, 2)))
    assert "(module, 2 tensors, 8 elements, 8 trainable parameters)" in live


def test_load_check_counts_the_model_as_torch_does_and_the_file_by_name(tmp_path: Path) -> None:
    model = ConvBN()
    params, buffers, trainable = torch_counts(model)
    path = tmp_path / "convbn.pt"
    torch.save(model.state_dict(), path)
    report = load_check(path, model=ConvBN)
    side = report.side("model")
    assert side is not None and report.passed
    # ConvBN() freezes its stem, as the factory builds it.
    assert (side.parameters, side.buffers, side.trainable) == (params, buffers, trainable)
    assert report.checkpoint.buffers == buffers and report.checkpoint.elements == params + buffers
    text = wide(report)
    assert f"convbn.pt  (torch-zip, 9 tensors, {params:,} parameters, {buffers:,} buffer elements)" in text
    assert f"{params:,} ({trainable:,} trainable)" in text and f"{buffers:,} elements" in text
    data = json.loads(report.to_json())["checkpoint"]
    assert (data["elements"], data["parameters"], data["buffers"]) == (params + buffers, params, buffers)

    plain = tmp_path / "linear.pt"
    torch.save(nn.Linear(3, 2).state_dict(), plain)
    assert "linear.pt  (torch-zip, 2 tensors, 8 elements)" in wide(load_check(plain, model=lambda: nn.Linear(3, 2)))
