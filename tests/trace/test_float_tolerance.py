"""The default tolerance knows float32: summation-order noise is no mismatch, a bug still is,
and explicit tolerances stay as strict as given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorparity.mapping import Mapping, Rearrange, Rule, apply_mapping
from tensorparity.numerics import Tolerance
from tensorparity.trace import capture, compare_traces
from tensorparity.trace._jobs import float_tolerance

TWO = (("two", 2),)
MAP = Mapping([Rule("up.weight", "up.weight", Rearrange("(two h) c -> (h two) c", TWO)),
               Rule("up.bias", "up.bias", Rearrange("(two h) -> (h two)", TWO)),
               Rule("down.weight", "down.weight", Rearrange("o (two h) -> o (h two)", TWO))])


class Block(nn.Module):
    """A feed-forward, then a depthwise conv whose bias gradient a BatchNorm cancels to rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(64, 512), nn.SiLU(), nn.Linear(512, 64)
        self.conv, self.bn = nn.Conv1d(64, 64, 5, padding=2, groups=64), nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(self.act(self.up(x)))
        return self.bn(self.conv(h.transpose(1, 2))).transpose(1, 2)


def pair(bug: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a, b = Block(), Block()
    b.load_state_dict({k: e.load() for k, e in apply_mapping(a.state_dict(), MAP).checkpoint.items()})
    if bug:
        b.bn.eps = 1e-2
    return a, b


def trace(model: nn.Module):  # noqa: ANN201
    x = torch.randn(8, 200, 64, generator=torch.Generator().manual_seed(1)) * 10
    w = torch.randn(8, 200, 64, generator=torch.Generator().manual_seed(2))  # a loss a BatchNorm does not cancel
    with capture(model) as t:
        (model(x) * w).sum().backward()
    return t


def test_a_correct_port_summing_in_another_order_passes_by_default() -> None:
    a, b = pair()
    ta, tb = trace(a), trace(b)
    report = compare_traces(ta, tb, mapping=MAP)
    assert report.verdict == "close" and not report.mismatched, report.summary()
    bias = next(t for t in report.params if t.key == "conv/0/param_grad/bias")
    assert bias.status == "close" and "ulp of max|b|" in bias.tolerance.describe()
    # the conv bias gradient is (almost) all rounding: the two sides differ far beyond its own
    # scale, which is why its atol comes from the terms it summed
    assert bias.max_rel > 1e-3
    # explicit tolerances stay strict: the same noise is then a mismatch
    strict = compare_traces(ta, tb, mapping=MAP, tolerance=Tolerance(atol=1e-9, rtol=1e-9))
    assert strict.verdict == "differs"
    assert compare_traces(ta, tb, mapping=MAP, tolerance=Tolerance(exact=True)).verdict == "differs"
    # a per-key tolerance (as --tol REGEX=... or a measured noise floor gives) is the user's word for
    # that key: it gets no float32 raise on top, while the other keys keep the default
    per_key = compare_traces(ta, tb, mapping=MAP, tolerance=Tolerance(overrides=((r"^conv/", Tolerance(
        atol=1e-12, rtol=1e-12)),)))
    conv = next(t for t in per_key.params if t.key == "conv/0/param_grad/bias")
    assert conv.status == "mismatch" and "ulp" not in conv.tolerance.describe()
    assert all("ulp of max|b|" in t.tolerance.describe() for t in per_key.params if not t.key.startswith("conv/"))


def test_a_bug_is_still_a_mismatch() -> None:
    a, b = pair(bug=True)
    first = compare_traces(trace(a), trace(b), mapping=MAP).first_divergence
    assert first is not None and (first.layer_a, first.origin) == ("bn", "introduced")


@pytest.mark.parametrize(("n", "ulps"), [(1, 2.0), (64, 16.0), (1024, 64.0)])
def test_the_allowance_grows_with_the_square_root_of_the_terms_summed(n: int, ulps: float) -> None:
    assert float_tolerance(Tolerance(), n).ulps == ulps


def test_an_element_near_zero_in_a_large_tensor_carries_the_noise_of_the_large_ones() -> None:
    from tensorparity.numerics import compare_tensors

    g = torch.tensor([300.0, -250.0, 1e-3])
    noisy = g + torch.tensor([0.0, 0.0, 3e-5])  # one ulp of 300 is 3e-5
    assert not compare_tensors("g", g, noisy).passed
    assert compare_tensors("g", g, noisy, Tolerance(ulps=4)).passed
    assert not compare_tensors("g", g, g + torch.tensor([0.0, 0.0, 1.0]), Tolerance(ulps=4)).passed
