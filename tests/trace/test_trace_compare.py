"""Comparing two traces: identical runs match; each injected bug is named as the first divergence
and marked introduced, the layers after it inherited; two implementations with other module names
match through a mapping and through automatic alignment; statistics-only traces, windows, saved
traces, different inputs, and the errors."""

from __future__ import annotations

import json
import math
import types
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import TraceRecord, tensor_stats
from tensorparity.errors import TensorParityError, UsageError
from tensorparity.examples import port_model, reference_model
from tensorparity.numerics import Tolerance
from tensorparity.trace import capture
from tensorparity.trace._compare import compare_stats, compare_traces, relative_error
from tensorparity.trace._trace_report import SCHEMA, TraceReport

MAP = files("tensorparity.examples") / "reference_to_port.yaml"


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.residual = True
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act: nn.Module = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc2(self.act(self.fc1(self.mix(self.norm(x))))))
        return x + h if self.residual else h


class Net(nn.Module):
    def __init__(self, d: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _detached_residual(self: Block, x: torch.Tensor) -> torch.Tensor:
    return x.detach() + self.drop(self.fc2(self.act(self.fc1(self.mix(self.norm(x))))))


def net(bug: str | None = None) -> Net:
    """The same weights every time; ``bug`` breaks block 1."""
    torch.manual_seed(0)
    model = Net().eval()
    block = model.blocks[1]
    if bug == "eps":
        block.norm.eps = 1e-2
    elif bug == "transposed":
        with torch.no_grad():
            block.mix.weight.copy_(block.mix.weight.T.clone())
    elif bug == "residual":
        block.residual = False
    elif bug == "relu":
        block.act = nn.ReLU()
    elif bug == "dropout":
        block.drop.train()
    elif bug == "detach":
        block.forward = types.MethodType(_detached_residual, block)  # type: ignore[method-assign]
    return model


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor = X, **options: object) -> Trace:
    with capture(model, **options) as trace:  # type: ignore[arg-type]
        model(x).sum().backward()
    return trace


@pytest.fixture(scope="module")
def reference() -> Trace:
    return run(net())


def test_identical_runs_match_forward_and_backward(reference: Trace) -> None:
    report = compare_traces(reference, run(net()))
    assert (report.verdict, report.exit_code, report.alignment) == ("identical", 0, "name")
    assert report.first_divergence is None and not report.mismatched and not report.warnings
    n = len(report.layers)
    assert n == 24 and report.forward_rate == (n, n) and report.backward_rate == (n, n)
    assert report.params_rate == (28, 28)
    assert report.classic_summary() == (f"Common layers: {n} / Only in A: 0 / Only in B: 0 / Matched: {n} / "
                                        f"Mismatched: 0 / Forward match rate: 100.0% / Backward match rate: 100.0% / "
                                        f"Parameter gradients matched: 28/28 → identical")
    assert all(x.origin is None and x.error == 0 for x in report.layers)


CULPRITS = {"eps": "blocks.1.norm", "transposed": "blocks.1.mix", "residual": "blocks.1", "relu": "blocks.1.act",
            "dropout": "blocks.1.drop"}


@pytest.mark.parametrize("align", ["name", "order"])
@pytest.mark.parametrize("bug", list(CULPRITS))
def test_each_injected_bug_is_the_first_divergence_and_introduced(reference: Trace, bug: str, align: str) -> None:
    report = compare_traces(reference, run(net(bug)), align=align)  # type: ignore[arg-type]
    culprit = CULPRITS[bug]
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.layer_b, first.direction) == (culprit, culprit, "forward")
    assert first.origin == "introduced" and first.error > 10 * first.input_error
    assert report.verdict == "differs" and report.exit_code == 1
    # Every layer before it matches forward; every other mismatched layer inherited its error from it.
    before = [x for x in report.layers if x.order < first.order]
    assert before and all(x.forward_passed for x in before)
    others = [x for x in report.mismatched if x is not first]
    assert others and all(x.origin == "inherited" and x.inherited_from == culprit for x in others)
    assert report.layers[-1].layer_a == "<model>" and report.layers[-1].forward_passed is False
    assert f"First divergence (forward): {culprit}" in str(report)


def test_a_backward_only_bug_is_found_in_the_backward_pass(reference: Trace) -> None:
    """A detached residual: the forward pass is bit for bit the same, the gradients are not."""
    report = compare_traces(run(net(), inputs=True), run(net("detach"), inputs=True))
    assert report.forward_rate[0] == report.forward_rate[1]
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.direction, first.origin) == ("blocks.1", "backward",
                                                                                     "introduced")
    assert first.backward_input_error == 0 and first.backward_error > 0
    assert {x.layer_a for x in report.mismatched} >= {"blocks.0", "embed"}
    # Without recorded input gradients the error is seen where it arrives, and said so.
    plain = compare_traces(reference, run(net("detach")))
    first = plain.first_divergence
    assert first is not None and (first.layer_a, first.origin, first.inherited_from) == ("blocks.0", "inherited", None)
    assert "capture with inputs=True" in str(plain)


def test_reference_and_port_match_through_the_mapping_and_automatic_alignment() -> None:
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    a, b = run(reference_model(), x), run(port_model(), x)
    by_map = compare_traces(a, b, mapping=MAP)
    by_order = compare_traces(a, b, align="order")
    found = compare_traces(a, b)  # no mapping given: found from the traces' parameters
    assert found.mapping == "found from the traces' parameters" and found.found_mapping is not None
    for report, n, only_a, only_b in ((by_map, 18, 6, 0), (by_order, 16, 12, 2), (found, 18, 6, 0)):
        assert report.verdict == "close" and report.exit_code == 0, report.summary()
        assert len(report.layers) == n and report.forward_rate == (n, n) and report.backward_rate == (n, n)
        assert len(report.only_a) == only_a and len(report.only_b) == only_b
    # Through the mapping A's q, k and v projections compare, concatenated, with B's fused qkv.
    qkv = next(x for x in by_map.layers if x.layer_b == "blocks.0.qkv")
    assert qkv.layer_a == "layers.0.self_attn.q_proj + layers.0.self_attn.k_proj + layers.0.self_attn.v_proj"
    assert qkv.passed and qkv.layout and "concatenated" in qkv.layout
    # Through the mapping the fused qkv's gradient is the concatenation of q's, k's and v's.
    assert by_map.params_rate == (30, 30) and by_map.mapping and by_map.mapping.endswith("reference_to_port.yaml")
    fused = [t for t in by_map.params if "q_proj" in t.key and t.key_b == "blocks.0.qkv/0/param_grad/weight"]
    assert len(fused) == 1 and fused[0].shape_b == (96, 32) and fused[0].passed
    assert by_order.params_rate == (26, 26) and len(by_order.params_only_a) == 12
    assert any("different model classes" in n for n in by_map.notes) and not by_map.warnings


@pytest.mark.parametrize("how", ["mapping", "order", "found"])
def test_a_bug_in_the_port_is_named_in_both_namings(how: str) -> None:
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    broken = port_model()
    broken.blocks[1].attn_norm.eps = 0.1
    report = compare_traces(run(reference_model(), x), run(broken, x), mapping=MAP if how == "mapping" else None,
                            align="order" if how == "order" else "auto")
    first = report.first_divergence
    assert first is not None and report.alignment == ("order" if how == "order" else "mapping")
    assert (report.found_mapping is not None) == (how == "found")
    assert (first.layer_a, first.layer_b, first.origin) == ("layers.1.norm1", "blocks.1.attn_norm", "introduced")
    assert all(x.origin == "inherited" for x in report.mismatched[1:])
    assert report.summary().startswith("differs: first divergence forward at layers.1.norm1 → blocks.1.attn_norm")


@pytest.mark.parametrize("bug", ["eps", "relu", "residual"])
def test_statistics_only_traces_compare_by_statistics(bug: str) -> None:
    reference = run(net(), mode="stats")
    same = compare_traces(reference, run(net(), mode="stats"))
    assert same.verdict == "identical"  # equal content hashes
    # Only the model's input is always stored (so that another environment can replay it).
    assert {x.layer_a: x.basis for x in same.layers if x.basis != "stats"} == {"<model>": "mixed"}
    report = compare_traces(reference, run(net(bug), mode="stats"))
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.origin, first.basis) == (CULPRITS[bug], "introduced", "stats")
    assert any("statistics only" in n for n in report.notes)
    text = str(report)
    assert "compared by statistics (a side stored no tensor)" in text and "elements" not in text
    assert json.loads(report.to_json())["layers"][1]["forward"][0]["basis"] == "stats"


def test_window_traces_compare_stored_layers_by_value_and_the_rest_by_statistics(reference: Trace) -> None:
    def window(bug: str | None) -> Trace:
        return run(net(bug), mode="window", window=r"blocks\.1")

    report = compare_traces(window(None), window("relu"))
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.basis, first.origin) == ("blocks.1.act", "tensors",
                                                                                "introduced")
    bases = {x.layer_a: x.basis for x in report.layers}
    assert bases["blocks.2.norm"] == "stats" and bases["embed"] == "stats"
    # A full trace against a window trace: stored on one side only means statistics.
    mixed = compare_traces(reference, window(None))
    assert mixed.verdict == "identical" and {x.basis for x in mixed.layers} == {"tensors", "stats"}


def test_different_inputs_are_a_loud_warning_and_never_a_match(reference: Trace) -> None:
    report = compare_traces(reference, run(net(), X + 1e-3))
    assert report.inputs_differ and report.verdict == "inputs differ" and report.exit_code == 1
    assert report.warnings[0].startswith("THE INPUTS DIFFER")
    assert all(x.origin in (None, "inherited") for x in report.layers)
    assert any(x.inherited_from == "<model input>" for x in report.layers)
    text = str(report)
    assert "WARNING: THE INPUTS DIFFER" in text and "→ inputs differ" in text


def test_traces_of_different_models_are_flagged(reference: Trace) -> None:
    class Other(Net):
        pass

    torch.manual_seed(0)
    other = Other().eval()
    other.load_state_dict(net().state_dict())
    report = compare_traces(reference, run(other))
    assert report.verdict == "identical"  # same numbers: the verdict stands, with the warning beside it
    assert any("different model classes" in w and "aligned by name" in w for w in report.warnings)
    unrelated = compare_traces(reference, run(nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 4)).eval()))
    assert any("are these traces of the same model?" in w for w in unrelated.warnings)
    assert unrelated.verdict != "identical"


def test_saved_traces_give_the_report_of_the_traces_in_memory(reference: Trace, tmp_path: Path) -> None:
    broken = run(net("eps"))
    in_memory = compare_traces(reference, broken)
    reference.save(tmp_path / "a")
    broken.save(tmp_path / "b")
    on_disk = compare_traces(tmp_path / "a", tmp_path / "b")
    expect, got = in_memory.to_dict(), on_disk.to_dict()
    for side in ("a", "b"):
        expect[side].pop("source"), got[side].pop("source")
    assert got == expect
    assert on_disk.a.source == str(tmp_path / "a")


def test_json_report(reference: Trace) -> None:
    report = compare_traces(reference, run(net("transposed")))
    data = json.loads(report.to_json())
    assert data["schema"] == SCHEMA == "tensorparity.trace-compare/1"
    assert (data["verdict"], data["exit_code"], data["alignment"]["method"]) == ("differs", 1, "name")
    assert data["first_divergence"]["layer_a"] == "blocks.1.mix"
    assert data["first_divergence"]["origin"] == "introduced"
    assert data["counts"]["mismatched"] == len(report.mismatched) and data["counts"]["common"] == 24
    layer = next(x for x in data["layers"] if x["layer_a"] == "blocks.1.fc1")
    assert layer["origin"] == "inherited" and layer["inherited_from"] == "blocks.1.mix"
    assert {t["kind"] for t in layer["forward"]} == {"output"}
    assert {t["kind"] for t in layer["backward"]} == {"grad_output", "param_grad"}
    assert data["parameter_gradients"][0]["kind"] == "param_grad"


def test_terminal_report_leads_with_the_summary_and_folds_long_lists(reference: Trace) -> None:
    report = compare_traces(reference, run(net("eps")))
    text = plain(report, top=3)
    lines = text.splitlines()
    assert lines.index(next(line for line in lines if line.startswith("Common layers:"))) < \
        lines.index(next(line for line in lines if line.startswith("First divergence")))
    assert "Mismatched layers, in execution order (24); inherited: from blocks.1.norm unless named" in text
    assert "… and 21 more" in text
    table = text[text.index("Mismatched layers"):text.index("… and 21 more")]
    assert "introduced" in table and "inherited" in table
    assert repr(report).startswith("<TraceReport")


def plain(report: TraceReport, *, top: int) -> str:
    import io

    from rich.console import Console

    out = io.StringIO()
    report.render(Console(file=out, width=140, color_system=None), top=top)
    return out.getvalue()


def record(t: torch.Tensor, *, stored: bool = False, dtype: str = "float32") -> TraceRecord:
    return TraceRecord(0, "fc", 0, "torch.nn.Linear", "output", "", tuple(t.shape), dtype, "cpu", tensor_stats(t),
                       stored)


def test_compare_stats_and_relative_error() -> None:
    x = torch.linspace(-1, 1, 64)
    assert compare_stats("fc/0/output", record(x), record(x.clone())).status == "identical"
    near = compare_stats("fc/0/output", record(x), record(x.flip(0)))  # same statistics, other tensor
    assert near.status == "close" and near.passed
    far = compare_stats("fc/0/output", record(x), record(x * 1.01))
    assert far.status == "mismatch" and far.max_abs > 0 and far.first_index is None
    assert compare_stats("fc/0/output", record(x), record(x[:8])).status == "shape"
    loose = compare_stats("fc/0/output", record(x), record(x * 1.01), Tolerance(rtol=0.05))
    assert loose.passed
    nan = x.clone()
    nan[3] = math.nan
    assert not compare_stats("fc/0/output", record(x), record(nan)).passed
    assert relative_error(far, tensor_stats(x)) > 0
    assert relative_error(compare_stats("k", record(x), record(x[:8])), None) == math.inf


def test_bad_arguments_and_unreadable_traces(reference: Trace, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        compare_traces(reference, reference, tolerance=1e-3)  # type: ignore[arg-type]
    assert err.value.fix == "pass tolerance=Tolerance(atol=..., rtol=...)"
    with pytest.raises(UsageError) as err:
        compare_traces(reference, reference, margin=0.5)
    assert "margin" in (err.value.fix or "")
    with pytest.raises(UsageError) as err:
        compare_traces(reference, {"w": torch.ones(1)})  # type: ignore[arg-type]
    assert "trace folder" in (err.value.fix or "")
    with pytest.raises(UsageError) as err:
        compare_traces(reference, reference, mapping=3)  # type: ignore[arg-type]
    assert err.value.fix == "pass mapping='map.yaml' or Mapping.from_yaml(...)"
    (tmp_path / "crashed").mkdir()
    with pytest.raises(TensorParityError) as err:
        compare_traces(reference, tmp_path / "crashed")
    assert "crashed" in str(err.value) and "no manifest.json" in str(err.value)
    assert "tensorparity.trace.capture" in (err.value.fix or "")


def test_multi_process_traces_compare_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun each rank writes ``rank-<r>/``; compare takes one rank, or every rank in turn
    (tests/trace/test_rank_compare.py has the rest)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, bug in ((0, None), (1, "relu")):
        monkeypatch.setenv("RANK", str(rank))
        for side, model in (("a", net()), ("b", net(bug))):
            with capture(model, out=tmp_path / side):
                model(X).sum().backward()
    assert compare_traces(tmp_path / "a", tmp_path / "b", rank=0).verdict == "identical"
    first = compare_traces(tmp_path / "a", tmp_path / "b", rank=1).first_divergence
    assert first is not None and first.layer_a == "blocks.1.act"
    every = compare_traces(tmp_path / "a", tmp_path / "b")
    assert [x.report.verdict for x in every.ranks] == ["identical", "differs"]  # type: ignore[union-attr]
    with pytest.raises(UsageError) as err:
        compare_traces(tmp_path / "a", tmp_path / "a/rank-0")
    assert "--each-rank" in (err.value.fix or "")


def test_nothing_to_pair_is_never_a_match(reference: Trace) -> None:
    empty = Trace([], {"schema": "tensorparity.trace/1"}, "full")
    report = compare_traces(reference, empty)
    assert (report.verdict, report.exit_code) == ("nothing compared", 1)
    assert any(w.startswith("no layer of A could be paired") for w in report.warnings)
    assert len(report.only_a) == 24 and report.summary().startswith("nothing compared")


def test_an_error_made_between_sub_layers_is_pinned_on_the_parent() -> None:
    """The port computes GELU inline (no module) with the tanh approximation: the error appears in
    what blocks.0.fc2 receives, made by nothing recorded; the block's own code is named."""
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))
    ref = reference_model()
    with capture(ref, inputs=True) as trace:
        ref(x).sum().backward()
    report = compare_traces(trace, port_model(bug="gelu_tanh"), mapping=str(MAP))
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.layer_b, first.origin) == ("layers.0", "blocks.0", "introduced")
    assert report.mismatched[0].layer_a == "layers.0.ffn.2" and report.mismatched[0].inherited_from == "layers.0"
    text = " ".join(str(report).split())
    assert "the error is made by this layer's own code between its sub-layers" in text
    assert "layers.0.ffn.1 (GELU)" in text


def test_the_garbage_collector_is_paused_during_a_compare_and_restored(reference: Trace) -> None:
    import gc

    seen = []

    class Watching:  # a RecordSource that notes the collector's state while it is read
        records, provenance = reference.records, reference.provenance

        def load(self, record: TraceRecord) -> torch.Tensor:
            seen.append(gc.isenabled())
            return reference.load(record)

    assert gc.isenabled()
    assert compare_traces(reference, Watching()).verdict == "identical"
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(UsageError):
        compare_traces(reference, Watching(), margin=0)
    assert gc.isenabled()
    gc.disable()
    try:
        compare_traces(reference, Watching())
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def test_torch_threads_are_lowered_during_a_compare_and_restored(reference: Trace) -> None:
    import os

    seen = []

    class Watching:  # a RecordSource that notes torch's thread count where the compare reads it
        records, provenance = reference.records, reference.provenance

        def load(self, record: TraceRecord) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return reference.load(record)

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(2, cores))
    try:
        assert compare_traces(reference, Watching(), workers=2).verdict == "identical"
        # two workers and the checksum thread hold three cores: torch gets what is left, at least one
        assert seen and set(seen) == {max(1, cores // 3)}
        assert torch.get_num_threads() == max(2, cores)
        seen.clear()
        torch.set_num_threads(1)  # never raised
        compare_traces(reference, Watching(), workers=2)
        assert set(seen) == {1} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_tensor_stored_once_on_both_sides_is_compared_once(reference: Trace, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorparity.trace._jobs as jobs

    for name, model in (("a", net()), ("b", net("eps"))):
        with capture(model, out=tmp_path / name):
            model(X).sum().backward()
    compared: list[str] = []
    engine = jobs.compare_pairs

    def counting(pairs, *args, **kwargs):  # type: ignore[no-untyped-def]
        def noted():  # type: ignore[no-untyped-def]
            for pair in pairs:
                compared.append(pair.key)
                yield pair
        return engine(noted(), *args, **kwargs)

    monkeypatch.setattr(jobs, "compare_pairs", counting)
    on_disk = compare_traces(tmp_path / "a", tmp_path / "b")
    measured = list(compared)
    compared.clear()
    in_memory = compare_traces(reference, run(net("eps")))
    # A dropout in eval mode returns its input: stored once on both sides and judged by the same
    # tolerance, measured once, reported under both keys. The model's output is its head's, but
    # judged by another atol (its own summand count): measured under each.
    assert len(measured) < len(compared)
    for key in ("blocks.1.drop/0/output", "blocks.2.drop/0/grad_output"):
        assert key in compared and key not in measured
    assert "<model>/0/model_output" in measured
    expect, got = in_memory.to_dict(), on_disk.to_dict()
    for side in ("a", "b"):  # the sides' provenance (the time of capture) may differ: the findings may not
        expect.pop(side), got.pop(side)
    assert got == expect
    drop = next(t for layer in on_disk.layers for t in layer.forward if t.key == "blocks.1.drop/0/output")
    fc2 = next(t for layer in on_disk.layers for t in layer.forward if t.key == "blocks.1.fc2/0/output")
    assert drop.status == fc2.status != "identical" and drop.max_abs == fc2.max_abs > 0
