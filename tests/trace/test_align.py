"""Aligning two traces: layers per call, module renames derived from a parameter-key mapping, and
pairing by name, through a mapping, and by execution order (sequence alignment)."""

from __future__ import annotations

import random
import time
from importlib.resources import files

import pytest
import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.records import TraceRecord, tensor_stats
from tensorparity.errors import UsageError
from tensorparity.examples import port_model, reference_model
from tensorparity.mapping import Mapping, Rule
from tensorparity.trace import capture
from tensorparity.trace._sequence import sequence_align
from tensorparity.trace.align import TraceLayer, align_layers, group_layers, module_renames

MAP = files("tensorparity.examples") / "reference_to_port.yaml"


def run(model: nn.Module, x: torch.Tensor) -> list[TraceRecord]:
    with capture(model) as trace:
        model(x).sum().backward()
    return trace.records


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(features: torch.Tensor) -> list[TraceRecord]:
    return run(reference_model(), features)


@pytest.fixture(scope="module")
def port(features: torch.Tensor) -> list[TraceRecord]:
    return run(port_model(), features)


def pairs(alignment: object) -> list[tuple[str, str]]:
    return [(m.a.name, m.b.name) for m in alignment.matches]  # type: ignore[attr-defined]


class Shared(nn.Module):
    """One Linear called twice: two layers, ``fc`` and ``fc#1``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.tanh(self.fc(x))))


def test_group_layers_gives_one_layer_per_call_in_forward_order() -> None:
    torch.manual_seed(0)
    layers = group_layers(run(Shared(), torch.randn(3, 4)))
    assert [x.name for x in layers] == ["fc", "fc#1", "out", "<model>"]
    first, second = layers[0], layers[1]
    assert first.order < second.order
    assert {r.kind for r in first.records} >= {"output", "grad_output", "param_grad"}
    assert not second.of_kind("param_grad")  # a parameter's gradient accumulates once, under call 0
    assert layers[-1].of_kind("model_input") and layers[-1].depth == 0
    assert first.backward_order is not None and first.backward_order > layers[-1].order


def test_module_renames_from_the_example_mapping() -> None:
    renames = module_renames(Mapping.from_yaml(MAP))
    assert renames.map("layers.1.norm1") == ("blocks.1.attn_norm", "rules[1]")
    assert renames.map("layers.0.self_attn.out_proj")[0] == "blocks.0.proj"
    assert renames.map("pre_encode") == ("subsample", "rules[0]")
    assert renames.map("decoder")[0] == "head"
    # Parent renames carry the sub-modules no rule names.
    assert renames.map("layers.3") == ("blocks.3", "the parent rename of rules[1]")
    assert renames.map("layers.0.ffn.1") == ("blocks.0.ffn.1", "the parent rename of rules[1]")
    # A concat rule fuses modules: they get no partner, and the reason names the rule.
    assert renames.map("layers.0.self_attn.k_proj") == (None, "fused by rules[3] into blocks.0.qkv")
    # A buffer rule (feature_mean -> mean) renames no module; unknown modules keep their name.
    assert renames.map("elsewhere") == ("elsewhere", "same name")


def test_module_renames_rest_placeholders_literal_parameter_names_and_prefixes() -> None:
    m = Mapping([Rule("model.layers.{i}.{rest*}", "layers.{i}.{rest*}"),
                 Rule("enc.proj.weight", "encoder.out.weight")], prefix_a="net")
    renames = module_renames(m)
    assert renames.map("model.layers.3.attn.q")[0] == "layers.3.attn.q"
    assert renames.map("model.layers.3")[0] == "layers.3"
    assert renames.map("enc.proj")[0] == "encoder.out"
    assert renames.map("net.enc.proj")[0] == "encoder.out"  # A's prefix is stripped first
    # A literal last part that is not a parameter name says nothing about modules...
    assert module_renames(Mapping([Rule("enc.scale_factor", "x.scale_factor")])).exact == ()
    # ...unless the traces recorded it as a parameter's name.
    found = module_renames(Mapping([Rule("enc.scale_factor", "x.scale_factor")]), param_names={"scale_factor"})
    assert found.map("enc")[0] == "x"


def test_module_renames_drop_conflicting_parents_and_regex_rules_with_a_note() -> None:
    m = Mapping([Rule("a.{i}.x.{p}", "b.{i}.x.{p}"), Rule("a.{i}.y.{p}", "c.{i}.y.{p}"),
                 Rule(r"old\.(\w+)", r"new.\1", regex=True)])
    renames = module_renames(m)
    assert renames.map("a.0.x") == ("b.0.x", "rules[0]")
    assert renames.map("a.0.z") == ("a.0.z", "same name")  # a.{i} -> b.{i} or c.{i}? neither
    assert any("renames 'a.{i}' differently" in n for n in renames.notes)
    assert any("rules[2] is a regular expression" in n for n in renames.notes)


def test_identical_runs_align_by_name_layer_for_layer(reference: list[TraceRecord], features: torch.Tensor) -> None:
    again = run(reference_model(), features)
    alignment = align_layers(reference, again)
    assert alignment.method == "name"
    assert pairs(alignment) == [(x.name, x.name) for x in group_layers(reference)]
    assert not alignment.only_a and not alignment.only_b


def test_reference_and_port_pair_the_same_layers_through_the_mapping_and_by_order(
        reference: list[TraceRecord], port: list[TraceRecord]) -> None:
    by_map = align_layers(reference, port, mapping=Mapping.from_yaml(MAP))
    by_order = align_layers(reference, port)
    assert (by_map.method, by_order.method) == ("mapping", "order")
    assert pairs(by_map) == pairs(by_order)
    expected = {("pre_encode", "subsample"), ("layers.0.norm1", "blocks.0.attn_norm"),
                ("layers.0.self_attn.out_proj", "blocks.0.proj"), ("layers.0.ffn.0", "blocks.0.fc1"),
                ("layers.0.ffn.2", "blocks.0.fc2"), ("layers.1", "blocks.1"), ("final_norm", "norm"),
                ("decoder", "head"), ("<model>", "<model>")}
    assert expected <= set(pairs(by_map)) and len(pairs(by_map)) == 16
    why = {u.layer.name: u.reason for u in by_map.only_a}
    assert why["layers.0.self_attn.q_proj"] == "fused by rules[3] into blocks.0.qkv"
    assert why["layers.1.ffn.1"].startswith("B has no layer blocks.1.ffn.1")  # the port's GELU is functional
    assert sorted(u.layer.name for u in by_map.only_b) == ["blocks.0.qkv", "blocks.1.qkv"]
    assert sorted(u.layer.name for u in by_order.only_b) == ["blocks.0.qkv", "blocks.1.qkv"]
    assert all(m.score is not None and m.score > 0 for m in by_order.matches if m.how == "order")


def test_order_alignment_survives_a_diverging_port(reference: list[TraceRecord], features: torch.Tensor) -> None:
    """After the runs part, statistics no longer help; class and shape keep the pairing."""
    broken = port_model()
    broken.blocks[0].attn_norm.eps = 0.5
    alignment = align_layers(reference, run(broken, features), method="order")
    assert pairs(alignment) == pairs(align_layers(reference, run(port_model(), features), method="order"))


def rec(i: int, module: str, cls: str, shape: tuple[int, ...], value: float = 0.0) -> TraceRecord:
    t = torch.full(shape, value)
    return TraceRecord(i, module, 0, f"torch.nn.{cls}", "output", "", shape, "float32", "cpu", tensor_stats(t), True)


def layers_of(*records: TraceRecord) -> list[TraceLayer]:
    return group_layers(list(records))


def test_sequence_alignment_pairs_equal_shapes_in_order_and_prefers_the_same_class() -> None:
    a = layers_of(rec(0, "x", "Linear", (2,)), rec(1, "y", "Linear", (3,)), rec(2, "z", "Linear", (2,)))
    b = layers_of(rec(0, "p", "Linear", (3,)), rec(1, "q", "Linear", (2,)))
    assert [(i, j) for i, j, _ in sequence_align(a, b)] == [(1, 0), (2, 1)]
    a = layers_of(rec(0, "n", "LayerNorm", (2, 4)), rec(1, "f", "Linear", (2, 4)))
    b = layers_of(rec(0, "proj", "Linear", (2, 4)))
    assert [(i, j) for i, j, _ in sequence_align(a, b)] == [(1, 0)]
    # Equal statistics beat equal class: what a layer computes says more than what it is called.
    a = layers_of(rec(0, "u", "Linear", (2, 4), 1.0), rec(1, "v", "Linear", (2, 4), 5.0))
    b = layers_of(rec(0, "w", "Linear", (2, 4), 5.0))
    assert [(i, j) for i, j, _ in sequence_align(a, b)] == [(1, 0)]
    assert sequence_align(a, []) == []


def test_sequence_alignment_is_monotone_shape_safe_and_finds_the_identity() -> None:
    rng = random.Random(0)
    classes, shapes = ["Linear", "LayerNorm", "GELU", "Conv1d"], [(2, 8), (2, 16), (4, 8)]
    seq = [rec(i, f"m{i}", rng.choice(classes), rng.choice(shapes), rng.random()) for i in range(300)]
    other = [r for r in seq if rng.random() < 0.7]
    a, b = layers_of(*seq), group_layers(other)
    found = sequence_align(a, b)
    assert all(a[i].shape == b[j].shape for i, j, _ in found)
    assert all(i1 < i2 and j1 < j2 for (i1, j1, _), (i2, j2, _) in zip(found, found[1:]))
    assert [(a[i].name, b[j].name) for i, j, _ in found] == [(x.name, x.name) for x in b]


def test_sequence_alignment_of_thousands_of_layers_is_quick() -> None:
    rng = random.Random(1)
    shapes = [(2, 32), (2, 64), (2, 128)]
    a = layers_of(*(rec(i, f"a.{i}", rng.choice(["Linear", "GELU"]), rng.choice(shapes), rng.random())
                    for i in range(2000)))
    b = layers_of(*(rec(i, f"b.{i}", rng.choice(["Linear", "GELU"]), rng.choice(shapes), rng.random())
                    for i in range(2000)))
    start = time.perf_counter()
    found = sequence_align(a, b)
    assert time.perf_counter() - start < 20  # O(n·m) in numpy: about a second on one core
    assert len(found) > 1000


def test_auto_alignment_and_bad_methods(reference: list[TraceRecord], port: list[TraceRecord]) -> None:
    assert align_layers(reference, reference).method == "name"
    assert align_layers(reference, port).method == "order"
    assert align_layers(reference, reference, method="order").method == "order"
    with pytest.raises(UsageError) as err:
        align_layers(reference, port, method="fuzzy")  # type: ignore[arg-type]
    assert err.value.fix == "pass align='auto', 'name', 'mapping' or 'order'"
    with pytest.raises(UsageError) as err:
        align_layers(reference, port, method="mapping")
    assert "--map" in (err.value.fix or "")
