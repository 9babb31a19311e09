"""capture(params=True): every parameter recorded once, as the first forward began (kind
``param``), in every mode; read back by Trace.parameters() / parameter_stats(), by
tensorparity.open (the ``param.`` section) and by map suggest; never a layer of its own."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tensorparity
import tensorparity.trace as tt
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import KINDS, tensor_stats
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.cli import app
from tensorparity.examples import port_model, reference_model
from tensorparity.mapping import suggest_mapping
from tensorparity.trace import capture

X = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(0))


def train_step(model: nn.Module, out: Path | None = None, **kwargs: object) -> Trace:
    """Forward, backward, an optimizer step and a second forward inside one capture."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with capture(model, out=out, **kwargs) as trace:
        model(X).sum().backward()
        opt.step()
        model(X)
    return trace


def test_full_mode_stores_every_parameter_as_the_first_forward_used_it() -> None:
    model = reference_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trace = train_step(model)
    assert "param" in KINDS
    records = trace.select(kind="param")
    assert [f"{r.module}.{r.path}" if r.module else r.path for r in records] == list(before)
    assert all(r.call == 0 and r.stored for r in records)
    assert records[0].module_type == "torch.nn.modules.conv.Conv1d"
    params = trace.parameters()
    assert list(params) == list(before)
    for key, value in params.items():
        assert isinstance(value, torch.Tensor) and torch.equal(value, before[key]), key
        assert not torch.equal(value, model.get_parameter(key))  # the step changed the model, not the record
    stats = trace.parameter_stats()
    assert stats["decoder.weight"] == tensor_stats(before["decoder.weight"])
    # Numbered after everything else; never a layer.
    assert min(r.index for r in records) > max(r.index for r in trace.records if r.kind != "param")


def test_stats_mode_keeps_statistics_and_fingerprints() -> None:
    model = reference_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trace = train_step(model, mode="stats")
    assert trace.parameters() == {}
    stats = trace.parameter_stats()
    assert list(stats) == list(before)
    assert all(stats[k] == tensor_stats(v) and stats[k].hash.startswith("fp2:") for k, v in before.items())


@pytest.mark.parametrize("window", [r"^layers\.1\.ffn", (1, 3)])
def test_window_mode_stores_the_parameters_of_modules_in_the_window(window: object) -> None:
    model = reference_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trace = train_step(model, mode="window", window=window)
    stored = set(trace.parameters())
    if isinstance(window, str):
        assert stored == {k for k in before if k.startswith("layers.1.ffn.")} and stored
    else:  # calls 1 and 2 began in the window: pre_encode and layers.0 (whose parameters its children own)
        assert stored == {"pre_encode.weight", "pre_encode.bias"}
    assert all(torch.equal(trace.parameters()[k], before[k]) for k in stored)
    assert set(trace.parameter_stats()) == set(before)
    # The same rule as their gradients.
    grads = {f"{r.module}.{r.path}": r.stored for r in trace.select(kind="param_grad")}
    assert {k for k, s in grads.items() if s} == stored


def test_params_false_filters_shared_and_parameterless_models() -> None:
    trace = train_step(reference_model(), params=False)
    assert not trace.select(kind="param") and trace.provenance["params"] is False
    assert trace.parameters() == {} == trace.parameter_stats()
    # Only the modules that pass the filters (the model's own parameters always).
    trace = train_step(reference_model(), include=r"^layers\.0\.ffn")
    assert set(trace.parameter_stats()) == {"layers.0.ffn.0.weight", "layers.0.ffn.0.bias", "layers.0.ffn.2.weight",
                                            "layers.0.ffn.2.bias"}
    # A tied parameter is one parameter: one record, under its first owner.
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with capture(tied) as trace:
        tied(torch.tensor([1, 2])).sum().backward()
    assert [r.key for r in trace.select(kind="param")] == ["0/0/param/weight"]
    assert [r.key for r in trace.select(kind="param_grad")] == ["0/0/param_grad/weight"]
    bare = nn.Sequential(nn.ReLU(), nn.Tanh())
    with capture(bare) as trace:
        bare(torch.ones(3, requires_grad=True)).sum().backward()
    assert not trace.select(kind="param") and trace.parameters() == {} and trace.layers() == ["<model>", "0", "1"]


def test_a_trace_folder_reads_back_the_same_parameters(tmp_path: Path) -> None:
    model = reference_model()
    trace = train_step(model, out=tmp_path / "t")
    opened = Trace.open(tmp_path / "t")
    assert opened.records == trace.records
    params = opened.parameters()
    assert all(isinstance(v, LazyTensor) for v in params.values())
    memory = train_step(reference_model())
    assert list(params) == list(memory.parameters())
    assert all(torch.equal(v.loader(), memory.parameters()[k]) for k, v in params.items())
    assert opened.parameter_stats() == memory.parameter_stats()
    # tensorparity.open lists them as the model section: a trace's weights diff against a checkpoint.
    with tensorparity.open(tmp_path / "t") as ckpt:
        assert ckpt.sections == {"param": "model"}
        assert "param.decoder.weight" in ckpt and "decoder/0/param/weight" not in ckpt
        assert list(ckpt.weights()) == list(params)
        assert list(ckpt)[:2] == ["<model>/0/model_input/0", "pre_encode/0/output"]
    weights = {k: v for k, v in reference_model().state_dict().items() if k in params}
    assert tensorparity.diff(tmp_path / "t", weights).verdict == "identical"


def test_a_trace_without_parameter_records_still_opens(tmp_path: Path) -> None:
    model = reference_model()
    with capture(model, out=tmp_path / "old", params=False) as trace:
        model(X).sum().backward()
    # As an older tensorparity wrote it: no parameter records, no params / call_sites provenance.
    manifest = tmp_path / "old" / "manifest.json"
    data = json.loads(manifest.read_text())
    for key in ("params", "call_sites"):
        del data["provenance"][key]
    manifest.write_text(json.dumps(data))
    old = Trace.open(tmp_path / "old")
    assert old.records == trace.records and old.parameters() == {} and old.parameter_stats() == {}
    assert old.module_path("layers.0.ffn") == "layers.0.ffn"
    with tensorparity.open(tmp_path / "old") as ckpt:
        assert list(ckpt) == [r.key for r in trace.records if r.stored] and len(ckpt.weights()) == 0


def test_suggest_mapping_pairs_two_traces_parameters(tmp_path: Path) -> None:
    traces = []
    for name, factory in (("ref", reference_model), ("port", port_model)):
        model = factory()
        with capture(model, out=tmp_path / name) as trace:
            model(X[..., :12]).sum().backward()
        traces.append(trace)
    from_traces = suggest_mapping(traces[0].parameters(), traces[1].parameters())
    from_models = suggest_mapping(dict(reference_model().named_parameters()), dict(port_model().named_parameters()))
    assert from_traces.complete
    assert [r.to_dict() for r in from_traces.mapping.rules] == [r.to_dict() for r in from_models.mapping.rules]
    from_folders = suggest_mapping(tmp_path / "ref", tmp_path / "port", weights_only=True)
    assert [r.to_dict() for r in from_folders.mapping.rules] == [r.to_dict() for r in from_models.mapping.rules]


def test_parameter_records_change_no_alignment_of_one_implementation() -> None:
    x = X[..., :12]
    reports = []
    for params in (True, False):
        runs = []
        for bump in (0.0, 1e-3):
            model = reference_model()
            with torch.no_grad():
                model.layers[1].ffn[2].bias += bump
            with capture(model, params=params) as trace:
                model(x).sum().backward()
            runs.append(trace)
        reports.append(tt.compare_traces(*runs))
    with_params, without = reports
    assert [(x.layer_a, x.layer_b, x.order, x.passed) for x in with_params.layers] == [
        (x.layer_a, x.layer_b, x.order, x.passed) for x in without.layers]
    assert with_params.only_a == without.only_a == () and with_params.only_b == without.only_b == ()
    assert with_params.first_divergence.layer_a == without.first_divergence.layer_a == "layers.1.ffn.2"


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)  # owns parameters, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_module_that_never_ran_is_no_layer() -> None:
    runs = []
    for _ in range(2):
        model = Unused()
        with capture(model) as trace:
            model(torch.ones(2, 3)).sum().backward()
        runs.append(trace)
    assert runs[0].layers() == ["<model>", "fc"] and "spare.weight" in runs[0].parameters()


def test_a_module_that_never_ran_is_not_compared() -> None:
    runs = []
    for _ in range(2):
        model = Unused()
        with capture(model) as trace:
            model(torch.ones(2, 3)).sum().backward()
        runs.append(trace)
    for align in ("name", "order"):
        report = tt.compare_traces(*runs, align=align)
        assert [x.layer_a for x in report.layers] == ["fc", "<model>"] and not report.only_a, align


def test_cli_params_switch(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "160"})
    ref = "tensorparity.examples:reference_model"
    for flag, name in (("--params", "on"), ("--no-params", "off")):
        result = runner.invoke(app, ["capture", ref, "-o", str(tmp_path / name), "--input-spec", "2x16x20",
                                     "--mode", "stats", flag])
        assert result.exit_code == 0, result.output
    on, off = Trace.open(tmp_path / "on"), Trace.open(tmp_path / "off")
    n = sum(1 for _ in reference_model().parameters())
    assert len(on.parameter_stats()) == n and not off.select(kind="param")
    assert f"of 28 layers and {n} parameters (ReferenceModel" in runner.invoke(
        app, ["capture", ref, "-o", str(tmp_path / "again"), "--input-spec", "2x16x20"]).stdout


def test_capture_with_params_changes_no_bit() -> None:
    base = reference_model().train()
    plain, traced = copy.deepcopy(base), copy.deepcopy(base)
    out_a = plain(X)
    out_a.sum().backward()
    with capture(traced, mode="stats"):
        out_b = traced(X)
        out_b.sum().backward()
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), traced.parameters()))
