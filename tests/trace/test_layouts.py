"""Activation layouts derived from a mapping's weight transforms, and healed layers.

Two attention implementations that differ only in the RoPE convention (rotate-half vs
interleaved pairs) compute the same attention output; the interleaved one's q/k weights have
their rows permuted within each head (what torchtune's ``hf_to_tune`` does). Through the mapping
the permutation is applied to the q/k outputs before comparing; without it, q/k differ and are
healed at the attention module; neither hides a real bug further down.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.records import tensor_stats
from tensorparity.mapping import Mapping, Rearrange, Rule, Split, Transpose
from tensorparity.trace import capture, compare_traces, replay
from tensorparity.trace._layout import combine_stats, derive_layouts, param_shapes
from tensorparity.trace.align import group_layers

D, H = 16, 2
HD = D // H


def rope_half(x: torch.Tensor) -> torch.Tensor:
    t = x.shape[-2]
    inv = 1.0 / 10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def rope_pairs(x: torch.Tensor) -> torch.Tensor:
    t = x.shape[-2]
    inv = 1.0 / 10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, rope: str) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        rot = rope_half if self.rope == "half" else rope_pairs

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, H, HD).transpose(1, 2)

        q, k, v = rot(heads(self.q_proj(x))), rot(heads(self.k_proj(x))), heads(self.v_proj(x))
        att = (q @ k.transpose(-1, -2) / math.sqrt(HD)).softmax(-1) @ v
        return self.o_proj(att.transpose(1, 2).reshape(b, t, D))


class Model(nn.Module):
    def __init__(self, rope: str) -> None:
        super().__init__()
        self.attn = Attention(rope)
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x + self.attn(x)))


# half-split rows of each head -> interleaved pairs (torchtune's hf_to_tune permutation)
PERMUTE = Rearrange("(h two d) c -> (h d two) c", (("h", H), ("two", 2)))

def rope_mapping() -> Mapping:
    return Mapping([Rule("attn.q_proj.weight", "attn.q_proj.weight", PERMUTE),
                    Rule("attn.k_proj.weight", "attn.k_proj.weight", PERMUTE)])


def pair(bug: str | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a, b = Model("half").eval(), Model("pairs").eval()
    sd = a.state_dict()
    for name in ("attn.q_proj.weight", "attn.k_proj.weight"):
        sd[name] = PERMUTE.apply([sd[name]])[0]
    b.load_state_dict(sd)
    if bug == "norm":
        b.norm.eps = 0.5
    elif bug == "v_proj":
        with torch.no_grad():
            b.attn.v_proj.weight[0] += 0.5
    return a, b


def trace(model: nn.Module, mode: str = "full"):  # noqa: ANN201
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with capture(model, mode=mode, inputs=True) as t:
        model(x).pow(2).mean().backward()
    return t


def test_the_rope_permutation_becomes_an_output_gather_index() -> None:
    a, b = pair()
    ta, tb = trace(a), trace(b)
    layouts = derive_layouts(rope_mapping(), param_shapes(ta.records), param_shapes(tb.records),
                             group_layers(ta.records), group_layers(tb.records))
    assert [x.a for x in layouts] == [("attn.q_proj",), ("attn.k_proj",)]
    q = layouts[0]
    # output feature j of B is feature index[j] of A: the pairs of each head interleaved
    assert q.out_index.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert q.in_index is None and "output features reordered" in q.describe()
    assert torch.equal(a.attn.q_proj(torch.ones(1, D))[..., q.out_index], b.attn.q_proj(torch.ones(1, D)))


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_through_the_mapping_every_layer_matches(mode: str) -> None:
    a, b = pair()
    report = compare_traces(trace(a, mode), trace(b, mode), mapping=rope_mapping())
    assert report.verdict == "close" and not report.mismatched and not report.healed, report.summary()
    q = next(x for x in report.layers if x.layer_a == "attn.q_proj")
    assert q.layout and "output features reordered" in q.layout and "rules[0]" in q.layout
    assert "what was done to A's activations" in str(report)


def test_without_a_mapping_the_reordered_projections_heal_at_the_attention() -> None:
    a, b = pair()
    report = compare_traces(trace(a), trace(b))
    assert report.alignment == "name"
    assert report.verdict == "close" and report.exit_code == 0, report.summary()
    assert {x.layer_a: x.healed_at for x in report.healed} == {"attn.q_proj": "attn", "attn.k_proj": "attn"}
    assert report.first_divergence is None and "differ in layout only (healed at attn)" in report.summary()
    assert "Healed: 2" in report.classic_summary()
    assert report.to_dict()["counts"]["healed"] == 2


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize(("bug", "culprit"), [("norm", "norm"), ("v_proj", "attn.v_proj")])
def test_a_real_bug_is_the_first_divergence_not_the_reordered_projections(bug: str, culprit: str,
                                                                          mapped: bool) -> None:
    a, b = pair(bug)
    report = compare_traces(trace(a), trace(b), mapping=rope_mapping() if mapped else None)
    first = report.first_divergence
    assert first is not None and first.layer_a == culprit and first.origin == "introduced", report.summary()
    # the reordered projections are no forward mismatch: transformed (mapping) or healed (names)
    q = next(x for x in report.layers if x.layer_a == "attn.q_proj")
    assert not q.forward_mismatch and (q.layout if mapped else q.healed_directions[0] == "forward")
    forward = [x.layer_a for x in report.mismatched if x.forward_mismatch]
    assert forward[0] == culprit and "attn.q_proj" not in forward


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(3 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.qkv(x)))


class Split3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out = nn.Linear(3 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(torch.cat([self.q(x), self.k(x), self.v(x)], -1)))


def fused_pair(bug: bool = False) -> tuple[nn.Module, nn.Module, Mapping]:
    torch.manual_seed(0)
    a, b = Fused(), Split3()
    mapping = Mapping([Rule("qkv.{p}", ["q.{p}", "k.{p}", "v.{p}"], Split(0, (D, D, D))),
                       Rule("out.{p}", "out.{p}")])
    from tensorparity.mapping import apply_mapping

    mapped = apply_mapping(a.state_dict(), mapping).checkpoint
    b.load_state_dict({k: e.load() for k, e in mapped.items()})
    if bug:
        with torch.no_grad():
            b.v.weight.mul_(1.5)
    return a, b, mapping


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_a_fused_module_compares_with_its_parts_concatenated(mode: str) -> None:
    a, b, mapping = fused_pair()
    report = compare_traces(trace(a, mode), trace(b, mode), mapping=mapping)
    assert report.verdict == "close" and not report.only_a and not report.only_b, report.summary()
    layer = next(x for x in report.layers if x.layer_a == "qkv")
    assert layer.layer_b == "q + k + v" and "compared with B's 3 outputs concatenated" in (layer.layout or "")
    assert [t.shape_a for t in layer.forward] == [(2, 5, 3 * D)]


def test_a_bug_in_one_part_of_a_fused_group_is_named() -> None:
    a, b, mapping = fused_pair(bug=True)
    report = compare_traces(trace(a), trace(b), mapping=mapping)
    first = report.first_divergence
    assert first is not None and (first.layer_a, first.layer_b) == ("qkv", "q + k + v")
    assert first.origin == "introduced"


def test_a_templated_fused_to_split_rule_pairs_every_layer() -> None:
    """``layers.{i}.qkv -> [layers.{i}.q, .k, .v]`` once crashed the module renames (a
    placeholder repeated in the joined target names)."""
    torch.manual_seed(0)
    a, b = nn.Sequential(), nn.Sequential()
    a.layers, b.layers = nn.ModuleList([Fused(), Fused()]), nn.ModuleList([Split3(), Split3()])
    a.forward = lambda x: a.layers[1](a.layers[0](x)[..., :D].contiguous())  # type: ignore[method-assign]
    b.forward = lambda x: b.layers[1](b.layers[0](x)[..., :D].contiguous())  # type: ignore[method-assign]
    mapping = Mapping([Rule("layers.{i}.qkv.{p}", ["layers.{i}.q.{p}", "layers.{i}.k.{p}", "layers.{i}.v.{p}"],
                            Split(0, (D, D, D))),
                       Rule("layers.{i}.out.{p}", "layers.{i}.out.{p}")])
    from tensorparity.mapping import apply_mapping

    b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), mapping).checkpoint.items()})
    report = compare_traces(trace(a), trace(b), mapping=mapping)
    assert report.verdict == "close", report.summary()
    assert {x.layer_b for x in report.layers if x.layout} == {"layers.0.q + layers.0.k + layers.0.v",
                                                               "layers.1.q + layers.1.k + layers.1.v"}


def test_transposed_weights_of_a_conv1d_style_module_need_no_activation_transform() -> None:
    class Conv1D(nn.Module):  # Hugging Face GPT-2's: weight [in, out]
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(D, 2 * D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    a, b = nn.Sequential(Conv1D()), nn.Sequential(nn.Linear(D, 2 * D, bias=False))
    b[0].weight.data = a[0].weight.data.T.contiguous()
    ta, tb = trace(a), trace(b)
    mapping = Mapping([Rule("0.weight", "0.weight", Transpose(0, 1))])
    layouts = derive_layouts(mapping, param_shapes(ta.records), param_shapes(tb.records), group_layers(ta.records),
                             group_layers(tb.records))
    assert layouts == []  # Conv1D's output rows are its weight's columns: nothing to reorder
    assert compare_traces(ta, tb, mapping=mapping).verdict == "close"


def test_packed_attention_weights_derive_no_layout_and_say_why() -> None:
    a = nn.Sequential(nn.MultiheadAttention(D, H, batch_first=True))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = a[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    model = Wrap()
    t = trace(model)
    mapping = Mapping([Rule("mha.in_proj_weight", ["q.weight", "k.weight", "v.weight"], Split(0))])
    qkv = {f"{p}.weight": ((D, D), "torch.nn.modules.linear.Linear") for p in "qkv"}
    layouts = derive_layouts(mapping, param_shapes(t.records), qkv, group_layers(t.records), [])
    assert len(layouts) == 1 and layouts[0].problem and "48 output rows" in layouts[0].problem


def test_a_conv_permutation_reorders_channels_on_axis_1_and_the_next_conv_inputs() -> None:
    torch.manual_seed(0)

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv1d(4, 6, 3), nn.Conv1d(6, 2, 1))

    a, b = model(), model()
    swap = Rearrange("(c two) -> (two c)", (("two", 2),))
    mapping = Mapping([Rule("0.weight", "0.weight", Rearrange("(c two) i k -> (two c) i k", (("two", 2),))),
                       Rule("0.bias", "0.bias", swap),
                       Rule("1.weight", "1.weight", Rearrange("o (c two) k -> o (two c) k", (("two", 2),)))])
    from tensorparity.mapping import apply_mapping

    b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), mapping).checkpoint.items()})
    x = torch.randn(2, 4, 9, requires_grad=True)
    traces = []
    for m in (a, b):
        with capture(m, inputs=True) as t:
            m(x).pow(2).sum().backward()
        traces.append(t)
    report = compare_traces(traces[0], traces[1], mapping=mapping)
    assert report.verdict == "close" and not report.healed, report.summary()
    layouts = {x.layer_a: x.layout for x in report.layers}
    assert "output features reordered" in layouts["0"] and "input features reordered" in layouts["1"]
    # Without the mapping the first conv's channels differ and heal at the whole model? No: the
    # model itself is never a healing point for its own layers unless it matches, and it does.
    plain = compare_traces(traces[0], traces[1])
    assert plain.verdict == "close" and {x.layer_a for x in plain.healed} == {"0", "1"}


def test_statistics_of_joined_parts_are_exact() -> None:
    parts = [torch.randn(100), torch.randn(37) * 3 + 1]
    joined = combine_stats([tensor_stats(p) for p in parts])
    whole = tensor_stats(torch.cat(parts))
    for name in ("min", "max", "mean", "std", "norm"):
        assert getattr(joined, name) == pytest.approx(getattr(whole, name), rel=1e-5)
    assert joined.numel == 137 and joined.hash == ""


# --- replay --------------------------------------------------------------------------------------------

def reference_with_inputs(model: nn.Module):  # noqa: ANN201
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with capture(model, inputs=True) as t, torch.no_grad():
        model(x)
    return t


@pytest.mark.parametrize("mapped", [True, False])
def test_replay_of_the_other_rope_convention_matches(mapped: bool) -> None:
    a, b = pair()
    report = replay(reference_with_inputs(a), b, mapping=rope_mapping() if mapped else None)
    assert report.verdict in ("identical", "close") and not report.culprits, report.summary()
    q = next(x for x in report.layers if x.layer == "attn.q_proj")
    if mapped:
        assert q.layout and "output features reordered" in q.layout and not q.reordered
    else:  # the same values in another order: a layout, said so, not an own error
        assert q.reordered and "same values, reordered" in q.describe()


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize(("bug", "culprit"), [("norm", "norm"), ("v_proj", "attn.v_proj")])
def test_replay_names_the_real_bug_alone(bug: str, culprit: str, mapped: bool) -> None:
    a, b = pair(bug)
    report = replay(reference_with_inputs(a), b, mapping=rope_mapping() if mapped else None)
    assert [x.layer for x in report.culprits] == [culprit], report.summary()


def test_replay_of_a_fused_module_on_its_parts() -> None:
    a, b, mapping = fused_pair()
    report = replay(reference_with_inputs(a), b, mapping=mapping)
    assert report.verdict in ("identical", "close"), report.summary()
    qkv = next(x for x in report.layers if x.layer == "qkv")
    assert qkv.module == "q + k + v" and "compared with B's 3 outputs concatenated" in (qkv.layout or "")
    a, b, mapping = fused_pair(bug=True)
    # the bug is in v: the part of the group that differs is named
    assert [(x.layer, x.module) for x in replay(reference_with_inputs(a), b, mapping=mapping).culprits] == [
        ("qkv", "v")]


# --- bad input ---------------------------------------------------------------------------------------

class TwoOutputs(nn.Linear):
    """Returns its output and its input: the layout fits the first, not the second."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(x), x


def test_a_layout_that_does_not_fit_a_record_is_said_on_the_layer_and_compared_without() -> None:
    torch.manual_seed(0)
    a, b = nn.Sequential(TwoOutputs(4, 8)), nn.Sequential(TwoOutputs(4, 8))
    swap = Rearrange("(c two) i -> (two c) i", (("two", 2),))
    b[0].weight.data = swap.apply([a[0].weight.data])[0]
    b[0].bias.data = Rearrange("(c two) -> (two c)", (("two", 2),)).apply([a[0].bias.data])[0]
    mapping = Mapping([Rule("0.weight", "0.weight", swap),
                       Rule("0.bias", "0.bias", Rearrange("(c two) -> (two c)", (("two", 2),)))])
    x = torch.randn(3, 4, requires_grad=True)
    traces = []
    for m in (a, b):
        with capture(m) as t:
            out = m(x)
            (out[0].sum() + out[1].sum()).backward()
        traces.append(t)
    report = compare_traces(traces[0], traces[1], mapping=mapping)
    layer = next(x for x in report.layers if x.layer_a == "0")
    assert any("does not fit its output 1 (A [3, 4], B [3, 4]; the layout reorders 8 features on axis -1): "
               "compared without it" in n for n in layer.layout_notes), layer.layout_notes
    # output 0 went through the layout (B's is A's reordered: bit for bit), output 1 as it is
    assert [(t.key, t.status) for t in layer.forward] == [("0/0/output/0", "identical"), ("0/0/output/1", "identical")]


class Interleave(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., [0, 2, 1, 3]]


def test_an_input_side_layout_without_recorded_inputs_is_said() -> None:
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Identity(), nn.Linear(4, 2)), nn.Sequential(Interleave(), nn.Linear(4, 2))
    cols = Rearrange("o (two c) -> o (c two)", (("two", 2),))
    b[1].weight.data = cols.apply([a[1].weight.data])[0]
    b[1].bias.data = a[1].bias.data.clone()
    mapping = Mapping([Rule("1.weight", "1.weight", cols)])
    x = torch.randn(3, 4)
    traces = []
    for m in (a, b):
        with capture(m) as t:
            m(x).sum().backward()
        traces.append(t)
    assert torch.allclose(a(x), b(x))
    report = compare_traces(traces[0], traces[1], mapping=mapping)
    layer = next(x for x in report.layers if x.layer_a == "1")
    assert layer.layout and "input features reordered" in layer.layout
    assert any("inputs were not recorded" in n for n in layer.layout_notes)
    assert report.verdict == "close", report.summary()


class FeedForward(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, 4 * D), act(), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


def interleaved_feed_forward(act: type[nn.Module] = nn.SiLU) -> tuple[nn.Module, nn.Module, Mapping]:
    """A feed-forward and a port storing its hidden features interleaved (rows of ``up``, columns
    of ``down``), and the mapping that says so."""
    from tensorparity.mapping import apply_mapping

    two = (("two", 2),)
    mapping = Mapping([Rule("up.weight", "up.weight", Rearrange("(two h) c -> (h two) c", two)),
                       Rule("up.bias", "up.bias", Rearrange("(two h) -> (h two)", two)),
                       Rule("down.weight", "down.weight", Rearrange("o (two h) -> o (h two)", two))])
    torch.manual_seed(0)
    a, b = FeedForward(), FeedForward(act)
    b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), mapping).checkpoint.items()})
    return a, b, mapping


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_an_activation_between_reordered_layers_carries_their_reordering(mode: str) -> None:
    a, b, mapping = interleaved_feed_forward()
    report = compare_traces(trace(a, mode), trace(b, mode), mapping=mapping)
    assert report.verdict in ("identical", "close") and report.exit_code == 0, report.summary()
    act = next(x for x in report.layers if x.layer_a == "act")
    assert not act.forward_mismatch and not act.backward_mismatch
    if mode == "full":  # found by the sibling's gather (no sort), and said so on the layer
        keys = [t.key for t in act.forward + act.backward]
        assert keys and all(k.endswith("(features reordered as up's)") for k in keys), keys
        assert act.layout == "features reordered as up's (its sibling's layout, carried)" and not act.healed_directions
        assert "act    features reordered as up's" in str(report)
    else:  # statistics keep their values whatever the order: nothing differs
        assert not act.healed_directions and act.layout is None, act


def test_a_wrong_activation_between_reordered_layers_is_the_first_divergence() -> None:
    a, b, mapping = interleaved_feed_forward(nn.GELU)
    report = compare_traces(trace(a), trace(b), mapping=mapping)
    first = report.first_divergence
    assert first is not None and first.layer_a == "act" and first.origin == "introduced", report.summary()
    assert [x.layer_a for x in report.mismatched if x.forward_mismatch][0] == "act"


@pytest.mark.parametrize("case", ["rope", "fused", "carried", "wrong activation", "conv"])
def test_reading_gathered_activations_in_place_reports_what_their_copies_report(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine reads A's reordered activations in place (``Gathered.load_view``, the C kernel's
    gathered route); with copies (``load`` only) every number of the report is the same."""
    from tensorparity.trace._layout import Gathered

    if case == "conv":
        torch.manual_seed(0)
        a, b = nn.Sequential(nn.Conv1d(4, 6, 3), nn.Conv1d(6, 2, 1)), nn.Sequential(nn.Conv1d(4, 6, 3),
                                                                                    nn.Conv1d(6, 2, 1))
        two = (("two", 2),)
        mapping = Mapping([Rule("0.weight", "0.weight", Rearrange("(c two) i k -> (two c) i k", two)),
                           Rule("0.bias", "0.bias", Rearrange("(c two) -> (two c)", two)),
                           Rule("1.weight", "1.weight", Rearrange("o (c two) k -> o (two c) k", two))])
        from tensorparity.mapping import apply_mapping

        b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), mapping).checkpoint.items()})
        x = torch.randn(2, 4, 9, requires_grad=True)
        traces = []
        for m in (a, b):
            with capture(m, inputs=True) as t:
                m(x).pow(2).sum().backward()
            traces.append(t)
        ta, tb = traces
    else:
        a, b, mapping = {"rope": lambda: (*pair(), rope_mapping()), "fused": fused_pair,
                         "carried": interleaved_feed_forward,
                         "wrong activation": lambda: interleaved_feed_forward(nn.GELU)}[case]()
        ta, tb = trace(a), trace(b)
    in_place = compare_traces(ta, tb, mapping=mapping)
    assert any(x.layout for x in in_place.layers)
    with monkeypatch.context() as m:
        m.setattr(Gathered, "load_view", None)  # the engine then calls load(): the gathered copy
        copied = compare_traces(ta, tb, mapping=mapping)
    assert in_place.to_json() == copied.to_json()
