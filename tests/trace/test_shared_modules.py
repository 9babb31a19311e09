"""capture(): a call is recorded under its call site, so one module instance shared by several
parents (NeMo's Conformer shares one activation among all its feed-forward blocks) is one layer
per parent, and two such traces align call by call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorparity.trace as tt
from tensorparity.trace import capture

WIDTH = 8


class FeedForward(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.linear1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.activation = activation
        self.linear2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(x)))


class Block(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.ff1 = FeedForward(activation)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.ff1(x))


class Stack(nn.Module):
    def __init__(self, activations: list[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)  # activations hold no parameters: both stacks get the same weights
        self.blocks = nn.ModuleList(Block(a) for a in activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def shared_stack(swap: bool = False) -> Stack:
    """Four blocks sharing ONE SiLU; with ``swap``, block 1 has its own GELU instead."""
    act = nn.SiLU()
    acts: list[nn.Module] = [act, act, act, act]
    if swap:
        acts[1] = nn.GELU()
    return Stack(acts)


def run(model: nn.Module, **kwargs: object) -> tt.Trace:
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
    with capture(model, **kwargs) as trace:
        model(x).sum().backward()
    return trace


ACTS = [f"blocks.{i}.ff1.activation" for i in range(4)]


def test_a_shared_module_is_recorded_under_each_call_site() -> None:
    model = shared_stack()
    assert model.blocks[3].ff1.activation is model.blocks[0].ff1.activation
    trace = run(model)
    outputs = [r for r in trace.select(kind="output") if r.module_type.endswith("SiLU")]
    assert [(r.module, r.call) for r in outputs] == [(name, 0) for name in ACTS]
    assert not any("#" in layer for layer in trace.layers())
    assert trace.provenance["call_sites"] == {name: ACTS[0] for name in ACTS[1:]}
    # Each record holds that call's own values, forward and backward.
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            hidden = block.ff1.linear1(x)
            assert torch.equal(trace.load(f"{ACTS[i]}/0/output"), torch.nn.functional.silu(hidden))
            x = block(x)
    assert {r.module for r in trace.select(kind="grad_output")} >= set(ACTS)
    # The registered name is still found from each call site.
    for name in ACTS:
        assert model.get_submodule(trace.module_path(name)) is model.blocks[0].ff1.activation
    assert trace.module_path("blocks.2.ff1.linear1") == "blocks.2.ff1.linear1"


def test_a_changed_activation_in_one_block_is_the_first_divergence() -> None:
    a, b = run(shared_stack()), run(shared_stack(swap=True))
    assert b.provenance["call_sites"] == {ACTS[2]: ACTS[0], ACTS[3]: ACTS[0]}
    report = tt.compare_traces(a, b)
    assert report.alignment == "name" and not report.only_a and not report.only_b
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.layer_b, first.origin) == (ACTS[1], ACTS[1], "introduced")
    assert next(x for x in report.layers if x.layer_a == ACTS[0]).forward_passed
    same = tt.compare_traces(a, run(shared_stack()))
    assert same.verdict == "identical" and not same.only_a and not same.only_b


def test_a_shared_parent_names_its_children_after_its_own_call_site() -> None:
    torch.manual_seed(0)
    ff = FeedForward(nn.SiLU())
    model = nn.Sequential(Block(nn.Identity()), Block(nn.Identity()))
    model[0].ff1 = model[1].ff1 = ff  # one whole feed-forward shared by both blocks
    trace = run(model, mode="stats")
    names = [r.module for r in trace.select(kind="output")]
    assert names[:4] == ["0.ff1.linear1", "0.ff1.activation", "0.ff1.linear2", "0.ff1"]
    assert names[6:10] == ["1.ff1.linear1", "1.ff1.activation", "1.ff1.linear2", "1.ff1"]
    assert trace.provenance["call_sites"]["1.ff1.linear1"] == "0.ff1.linear1"
    # One parameter, one gradient and one value, under the owner's registered name.
    assert sorted(r.key for r in trace.select(kind="param_grad") if "linear1" in r.module) == [
        "0.ff1.linear1/0/param_grad/bias", "0.ff1.linear1/0/param_grad/weight"]
    assert [r.key for r in trace.select(kind="param") if "linear1" in r.module] == [
        "0.ff1.linear1/0/param/weight", "0.ff1.linear1/0/param/bias"]


class Outside(nn.Module):
    """``head`` calls a module it does not hold (a plain reference, not a sub-module)."""

    def __init__(self, clash: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(WIDTH, WIDTH))
        if clash:
            self.head.add_module("1", nn.Identity())  # "head.1" is a real module path
        self.head.forward = self._head  # type: ignore[method-assign]
        self._borrowed = [self.body[1]]  # a list: not registered

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self._borrowed[0](self.head[0](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("clash", [False, True])
def test_a_module_called_from_outside_its_tree(clash: bool) -> None:
    trace = run(Outside(clash), mode="stats")
    tanh = [(r.module, r.call) for r in trace.select(kind="output") if r.module_type.endswith("Tanh")]
    if clash:  # the caller's name plus its own would name another module: keep the registered name
        assert tanh == [("body.1", 0), ("body.1", 1)] and trace.provenance["call_sites"] == {}
    else:
        assert tanh == [("body.1", 0), ("head.1", 0)]
        assert trace.provenance["call_sites"] == {"head.1": "body.1"}


class Skipper(nn.Module):
    """Calls its grandchild directly, and a child whose first attempt raises and is caught."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Sequential(nn.Linear(WIDTH, WIDTH)))
        self.fast = Raiser()
        self.slow = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enc[0][0](x)
        try:
            return self.fast(x)
        except RuntimeError:
            return self.slow(x)


class Raiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner(x)
        raise RuntimeError("no fast path here")


def test_grandchildren_and_a_raising_forward_keep_their_names() -> None:
    model = Skipper()
    trace = run(model)
    outputs = [r.module for r in trace.select(kind="output")]
    # The grandchild keeps its path; after fast raised (and was caught), slow is the model's
    # own call, not fast's.
    assert outputs == ["enc.0.0", "fast.inner", "slow"]
    assert trace.provenance["call_sites"] == {}
    # A forward that raises out of the block leaves nothing behind for the next capture.
    with pytest.raises(RuntimeError):
        with capture(model.fast):
            model.fast(torch.ones(1, WIDTH))
    assert [r.module for r in run(model).select(kind="output")] == outputs


def test_filters_and_windows_see_the_call_site_name() -> None:
    trace = run(shared_stack(), include=r"^blocks\.2\.", mode="window", window=r"^blocks\.2\.ff1\.act")
    acts = [r for r in trace.select(kind="output") if r.module_type.endswith("SiLU")]
    assert [(r.module, r.stored) for r in acts] == [(ACTS[2], True)]
    stored = {r.module for r in trace.records if r.stored and r.module and r.kind != "param_signature"}
    assert stored == {ACTS[2]}
