"""capture(): what it records (forward, backward, calls, nested outputs, values), that it never
changes the numbers, that hooks are always removed, and the stats and window modes."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import tensorparity.trace as tt
from tensorparity.checkpoint.tracefolder.records import tensor_stats
from tensorparity.errors import UsageError
from tensorparity.examples import reference_model
from tensorparity.trace import capture
from tensorparity.trace.seed import input_hash


class Twice(nn.Module):
    """One Linear called twice, then an in-place ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(self.lin(x)))


class Pair(NamedTuple):
    doubled: torch.Tensor
    shifted: torch.Tensor


@dataclass
class Extra:
    total: torch.Tensor
    note: str


class ModelOutputLike(OrderedDict):
    """Shaped like a Hugging Face ModelOutput: a dataclass that is also an OrderedDict of its set fields."""

    def __init__(self, last_hidden_state: torch.Tensor, attentions: torch.Tensor | None = None) -> None:
        super().__init__(last_hidden_state=last_hidden_state)
        if attentions is not None:
            self["attentions"] = attentions


class Nested(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"pair": Pair(x * 2, x + 1), "extra": Extra(x.sum(), "ok"), "count": x.shape[0], "none": None,
                "hf": ModelOutputLike(x - 1)}


class Counter(nn.Module):
    """Returns a non-tensor."""

    def forward(self, x: torch.Tensor) -> int:
        return int(x.shape[-1])


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(4, 4)
        self.nested = Nested()
        self.counter = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nested(self.proj(x))
        width = self.counter(x)
        return out["pair"].doubled * width + out["hf"]["last_hidden_state"] + out["extra"].total


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    out.float().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) + sum(
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def test_public_entry_point_records_forward_and_backward() -> None:
    model = Twice()
    x = torch.randn(3, 4)
    with tt.capture(model) as trace:
        model(x).sum().backward()
    keys = [r.key for r in trace.records]
    assert keys[0] == "<model>/0/model_input/0"
    assert keys[1:5] == ["lin/0/output", "lin/1/output", "act/0/output", "<model>/0/model_output"]
    # Backward continues the count as gradients arrive: the model's output (act's output: the same
    # tensor, so both hooks fire, in the order they were placed), lin's second call, its first.
    backward = keys[5:]
    assert backward[:2] == ["act/0/grad_output", "<model>/0/grad_output"]
    assert backward.index("act/0/grad_output") < backward.index("lin/1/grad_output") < backward.index(
        "lin/0/grad_output")
    assert {"lin/0/param_grad/weight", "lin/0/param_grad/bias"} <= set(backward)
    assert [r.index for r in trace.records] == list(range(len(keys)))
    # The parameters, read as the forward began, are numbered after everything else.
    assert keys[-2:] == ["lin/0/param/weight", "lin/0/param/bias"]
    assert trace.layers() == ["<model>", "lin", "lin#1", "act"]
    assert [r.call for r in trace.select(module="lin", kind="output")] == [0, 1]


def test_in_place_relu_output_and_gradients_are_the_real_ones() -> None:
    model = Twice()
    x = torch.randn(3, 4)
    with capture(model) as trace:
        y = model(x)
        (y * torch.arange(4.0)).sum().backward()
    h1 = model.lin(x)
    h2 = model.lin(h1)
    # lin#1's output was overwritten in place by the ReLU; the record holds it as lin returned it.
    assert torch.equal(trace.load("lin/1/output"), h2.detach())
    assert torch.equal(trace.load("act/0/output"), torch.relu(h2).detach())
    # The gradient w.r.t. lin#1's output passed through the ReLU; w.r.t. act's output it did not.
    upstream = torch.arange(4.0).expand(3, 4)
    assert torch.equal(trace.load("act/0/grad_output"), upstream)
    assert torch.equal(trace.load("lin/1/grad_output"), upstream * (h2 > 0))
    assert torch.equal(trace.load("lin/0/param_grad/weight"), model.lin.weight.grad)


def test_capture_changes_no_bit_of_outputs_or_gradients() -> None:
    base = reference_model().train()  # dropout-free, but train mode exercises the training path
    x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(0))
    plain_model, traced_model = copy.deepcopy(base), copy.deepcopy(base)
    out_a, grads_a = run(plain_model, x)
    with capture(traced_model, inputs=True) as trace:
        out_b, grads_b = run(traced_model, x)
    assert bits(out_a) == bits(out_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(bits(grads_a[k]) == bits(grads_b[k]) for k in grads_a)
    # And the trace holds those very values.
    assert bits(trace.load("<model>/0/model_output")) == bits(out_a)
    assert bits(trace.load("decoder/0/param_grad/weight")) == bits(grads_a["decoder.weight"])
    assert trace.select(kind="grad_input")  # inputs=True also records gradients w.r.t. inputs


def test_nested_outputs_are_flattened_with_paths_and_values_kept() -> None:
    model = Wrapper()
    x = torch.randn(2, 4)
    with capture(model) as trace:
        model(x).sum().backward()
    nested = {r.path: r for r in trace.select(module="nested", kind="output")}
    assert list(nested) == ["pair.doubled", "pair.shifted", "extra.total", "extra.note", "count", "none",
                            "hf.last_hidden_state"]
    assert nested["count"].is_tensor is False and nested["count"].value == 2 and not nested["count"].stored
    assert nested["none"].value is None and nested["extra.note"].value == "ok"
    assert torch.equal(trace.load(nested["pair.doubled"]), model.proj(x).detach() * 2)
    counter = trace.select(module="counter", kind="output")
    assert [(r.path, r.value, r.is_tensor, r.dtype) for r in counter] == [("", 4, False, "int")]
    # Gradients arrive at the nested tensors that were used, under the same paths.
    grads = {r.path for r in trace.select(module="nested", kind="grad_output")}
    assert grads == {"pair.doubled", "extra.total", "hf.last_hidden_state"}


def test_hooks_are_removed_after_the_block_and_on_error() -> None:
    model = Twice()
    before = hook_counts(model)
    with capture(model) as trace:
        model(torch.randn(2, 4)).sum().backward()
    assert hook_counts(model) == before
    n = len(trace.records)
    model(torch.randn(2, 4)).sum().backward()  # nothing more is recorded after the block
    assert len(trace.records) == n

    with pytest.raises(RuntimeError, match="boom"):
        with capture(model):
            y = model(torch.randn(2, 4))
            raise RuntimeError("boom")
    assert hook_counts(model) == before
    assert not y._backward_hooks  # the gradient hook placed on the output during the failed block is gone
    y.sum().backward()

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ torch.ones(3, 3)  # shape error inside the model

    broken = Broken()
    with pytest.raises(RuntimeError):
        with capture(broken):
            broken(torch.randn(2, 4))
    assert hook_counts(broken) == 0


def test_include_exclude_and_types_filter_modules() -> None:
    model = reference_model()
    x = torch.randn(2, 16, 20)
    with capture(model, include=r"^layers\.0\.", exclude=r"proj$", param_grads=False) as trace:
        model(x).sum().backward()
    modules = {r.module for r in trace.records}
    assert modules == {"", "layers.0.norm1", "layers.0.self_attn", "layers.0.norm2", "layers.0.ffn",
                       "layers.0.ffn.0", "layers.0.ffn.1", "layers.0.ffn.2"}
    assert not trace.select(kind="param_grad")
    with capture(model, types=[nn.LayerNorm, "Linear"], grads=False) as trace:
        model(x)
    kinds = {(r.module_type.rsplit(".", 1)[-1], r.kind) for r in trace.records if r.module}
    assert kinds == {("LayerNorm", "output"), ("Linear", "output"), ("LayerNorm", "param"), ("Linear", "param")}


def test_model_input_is_always_stored_and_hashed() -> None:
    model = reference_model()
    x = torch.randn(2, 16, 20)
    with capture(model, mode="stats") as trace:
        model(x)
    (rec,) = trace.select(kind="model_input")
    assert rec.stored and torch.equal(trace.load(rec), x)
    assert trace.provenance["input_hash"] == input_hash(x)
    args, kwargs = trace.inputs()
    assert torch.equal(args[0], x) and kwargs == {}
    assert torch.equal(model(*args), model(x))


def test_stats_mode_equals_tensor_stats_of_the_full_tensors() -> None:
    model = reference_model()
    x = torch.randn(2, 16, 20)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    with capture(m1) as full:
        m1(x).sum().backward()
    with capture(m2, mode="stats") as stats:
        m2(x).sum().backward()
    # In stats mode each parameter also gets its stored content signature (see test_params).
    sigs = [r for r in stats.records if r.kind == "param_signature"]
    assert len(sigs) == len(list(model.parameters())) and all(r.stored and r.dtype == "int64" for r in sigs)
    plain = [r for r in stats.records if r.kind != "param_signature"]
    assert [r.key for r in full.records] == [r.key for r in plain]
    for a, b in zip(full.records, plain):
        if b.kind == "model_input":
            assert b.stored
            continue
        assert not b.stored and a.stored
        assert b.stats == tensor_stats(full.load(a)) == a.stats, a.key
    with pytest.raises(tt.TraceError, match="statistics only .*fix: capture with mode='full'"):
        stats.load(stats.records[2])


def test_stats_mode_measures_a_tensor_again_after_an_in_place_change() -> None:
    # lin#1's output object is recorded, changed in place by the ReLU, and recorded again as act's
    # output and as the model's: one object, two contents, told apart by its version counter.
    model = Twice()
    x = torch.randn(3, 4)
    with capture(model, mode="stats") as trace:
        model(x).sum().backward()
    with torch.no_grad():
        h2 = model.lin(model.lin(x))
    assert trace.get("lin/1/output").stats == tensor_stats(h2)
    assert trace.get("act/0/output").stats == tensor_stats(torch.relu(h2))
    assert trace.get("<model>/0/model_output").stats == tensor_stats(torch.relu(h2))
    wrapped = nn.Sequential(nn.Linear(4, 4))  # the container's output is its child's, measured once
    with capture(wrapped, mode="stats") as trace:
        wrapped(x).sum().backward()
    assert trace.get("0/0/output").stats == trace.get("<model>/0/model_output").stats
    assert trace.get("0/0/output").stats == tensor_stats(wrapped(x))
    with torch.inference_mode(), capture(wrapped, mode="stats") as trace:  # no version counters here
        out = wrapped(x)
    assert trace.get("0/0/output").stats == tensor_stats(out) == trace.get("<model>/0/model_output").stats


def test_window_mode_stores_only_the_window() -> None:
    model = reference_model()
    x = torch.randn(2, 16, 20)
    with capture(model, mode="window", window=r"^layers\.1\.ffn") as trace:
        model(x).sum().backward()
    stored = {r.module for r in trace.records if r.stored and r.kind != "param_signature"}
    assert stored == {"", "layers.1.ffn", "layers.1.ffn.0", "layers.1.ffn.1", "layers.1.ffn.2"}
    # parameters outside the window keep their content signature, those inside their tensor
    assert trace.get("layers.0.ffn.2/0/param_signature/weight").stored
    assert "layers.1.ffn.2/0/param_signature/weight" not in {r.key for r in trace.records}
    assert trace.get("layers.1.ffn.2/0/param_grad/weight").stored
    assert not trace.get("layers.0.ffn.2/0/param_grad/weight").stored
    assert trace.get("layers.0.ffn/0/output").stats is not None
    # An index range counts module calls in the order they begin: 0 the model, 1 pre_encode, 2 layers.0 ...
    with capture(model, mode="window", window=(1, 3), grads=False) as trace:
        model(x)
    assert {r.module for r in trace.records if r.stored and r.kind != "param_signature"} == {"", "pre_encode",
                                                                                              "layers.0"}


def test_bad_options_are_all_reported_at_once_before_any_hook() -> None:
    model = Twice()
    with pytest.raises(UsageError) as err:
        with capture(model, include="(", mode="nope", types=[int]):
            pass
    text = str(err.value)
    assert "include '(' is not a regular expression" in text and "mode 'nope'" in text and "types entry" in text
    assert "fix: e.g. capture(model" in text
    with pytest.raises(UsageError, match="needs window="):
        with capture(model, mode="window"):
            pass
    assert hook_counts(model) == 0


def test_called_modules_under_no_grad_record_forward_only() -> None:
    model = Twice()
    with torch.no_grad(), capture(model) as trace:
        model(torch.randn(2, 4))
    assert {r.kind for r in trace.records} == {"model_input", "output", "model_output", "param"}


def test_two_forward_calls_of_the_model_are_calls_0_and_1() -> None:
    model = Twice()
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with capture(model, grads=False, param_grads=False) as trace:
        model(a)
        model(b)
    assert [r.call for r in trace.select(kind="model_input")] == [0, 1]
    assert trace.provenance["input_hashes"] == [input_hash(a), input_hash(b)]
    assert torch.equal(trace.inputs(1)[0][0], b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_streams_to_disk_and_stats_stay_on_the_device(tmp_path: Path) -> None:
    model = reference_model().cuda()
    x = torch.randn(2, 16, 20, device="cuda")
    plain = copy.deepcopy(model)
    out_a, grads_a = run(plain, x)
    with capture(model, out=tmp_path / "t") as full:
        out_b, grads_b = run(model, x)
    assert torch.equal(out_a, out_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    rec = full.get("decoder/0/output")
    assert rec.device == "cuda:0" and rec.stats.hash  # the writer's CPU copy is hashed
    assert torch.equal(full.load(rec), out_b.cpu())
    with capture(model, mode="stats") as stats:
        run(model, x)
    assert stats.get("decoder/0/output").stats.hash.startswith("fp2:")  # fingerprinted on the device
    assert stats.get("decoder/0/output").stats.max == pytest.approx(rec.stats.max)
