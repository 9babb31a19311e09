"""The C comparison kernel (compare/_kernel.c) against the torch route it replaces: the same
counts, first index and maxima, the largest ratios to an ulp, sums to rounding; NaN and Inf
handed back to the torch route; bad buffers refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorparity.numerics import TensorComparison, Tolerance, compare_tensors, metrics, same_bytes
from tensorparity.numerics.gathered import Gather

needs_kernel = pytest.mark.skipif(metrics._kernel is None, reason="the C kernel is not built here")

EXACT = ("status", "passed", "n_mismatch", "first_index", "first_a", "first_b", "max_abs",
         "required_atol", "nan_a", "nan_b", "inf_a", "inf_b", "nan_agree", "inf_agree", "tolerance")
RATIOS = ("max_rel", "required_rtol")  # found by cross-multiplication: the largest quotient, to an ulp
SUMS = ("mean_abs", "cosine")


def both_routes(monkeypatch: pytest.MonkeyPatch, a: torch.Tensor, b: torch.Tensor, tol: Tolerance | None = None):
    kernel = compare_tensors("t", a, b, tol)
    with monkeypatch.context() as m:
        m.setattr(metrics, "_kernel", None)
        torch_route = compare_tensors("t", a, b, tol, chunk=4096)
    return kernel, torch_route


def assert_same(kernel, torch_route) -> None:
    for field in EXACT:
        assert getattr(kernel, field) == getattr(torch_route, field), field
    for field in RATIOS:
        assert getattr(kernel, field) == pytest.approx(getattr(torch_route, field), rel=5e-16, abs=0), field
    for field in SUMS:
        assert getattr(kernel, field) == pytest.approx(getattr(torch_route, field), rel=1e-12, abs=1e-300), field


@needs_kernel
def test_the_kernel_is_built_and_used_for_float32_and_float64() -> None:
    a = torch.randn(1000)
    b = a + 1e-3
    for dtype in (torch.float32, torch.float64):
        assert metrics._kernel_acc(a.to(dtype), b.to(dtype), Tolerance().for_key("t", dtype, dtype)) is not None
    # other dtypes, mixed dtypes and exact mode stay on the torch route
    assert metrics._kernel_acc(a.half(), b.half(), Tolerance().for_key("t", torch.float16, torch.float16)) is None
    assert metrics._kernel_acc(a, b.double(), Tolerance().for_key("t", torch.float32, torch.float64)) is None
    assert metrics._kernel_acc(a, b, Tolerance(exact=True).for_key("t", torch.float32, torch.float32)) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 7, 1023, 1024, 1025, 5000, 70_001])
def test_kernel_matches_the_torch_route(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, size: int) -> None:
    g = torch.Generator().manual_seed(size)
    a = torch.randn(size, generator=g, dtype=dtype)
    b = a + 1e-4 * torch.randn(size, generator=g, dtype=dtype)
    b[::97] = 0.0  # a zero |b|: the ratio rules for it
    a[::193] = 0.0
    statuses = []
    for tol in (None, Tolerance(atol=1e-5, rtol=1e-5), Tolerance(atol=0, rtol=0), Tolerance(atol=10.0, rtol=0.0),
                Tolerance(atol=1e-4, rtol=1e-3, statistic="max")):
        kernel, torch_route = both_routes(monkeypatch, a, b, tol)
        assert_same(kernel, torch_route)
        statuses.append(kernel.status)
    if size > 1:  # every value moved: no tolerance mismatches nothing, atol 10 passes all
        assert statuses[2] == "mismatch" and statuses[3] == "close"


@needs_kernel
def test_first_mismatch_in_a_later_block_and_at_the_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.zeros(10_000)
    b = a.clone()
    b[5_000] = 1.0  # block 4 of 1024
    b[9_999] = 2.0  # the last, partial block
    kernel, torch_route = both_routes(monkeypatch, a, b)
    assert_same(kernel, torch_route)
    assert kernel.first_index == (5_000,) and kernel.n_mismatch == 2 and kernel.max_abs == 2.0
    assert kernel.max_rel == 1.0  # |a - b| / |b| = 1 at both


@needs_kernel
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_go_to_the_torch_route(monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    a = torch.randn(3000)
    b = a + 1e-3
    assert metrics._kernel_acc(a, b, Tolerance().for_key("t", a.dtype, b.dtype)) is not None
    for x, y in ((a.clone(), b), (a, b.clone())):
        (x if x is not a else y)[1234] = bad
        assert metrics._kernel_acc(x, y, Tolerance().for_key("t", a.dtype, b.dtype)) is None
        kernel, torch_route = both_routes(monkeypatch, x, y)
        assert_same(kernel, torch_route)
        assert kernel.nan_a + kernel.nan_b + kernel.inf_a + kernel.inf_b == 1


@needs_kernel
def test_views_numpy_cannot_share_and_non_contiguous_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(64, 48)
    b = a + 1e-3 * torch.randn(64, 48)
    kernel, torch_route = both_routes(monkeypatch, a.t(), b.t())  # transposed: copied contiguous first
    assert_same(kernel, torch_route)
    negated = torch._neg_view(-b)  # a view with the negative bit set: numpy refuses to share it
    assert negated.is_neg() and metrics._kernel_acc(a, negated, Tolerance().for_key("t", a.dtype, a.dtype)) is None
    kernel, torch_route = both_routes(monkeypatch, a, negated)
    assert_same(kernel, torch_route)
    assert kernel.max_abs == pytest.approx(float((a - b).abs().max()))
    grad = a.clone().requires_grad_()
    kernel, torch_route = both_routes(monkeypatch, grad, b)
    assert_same(kernel, torch_route)


@needs_kernel
def test_bad_buffers_are_refused_not_read() -> None:
    from tensorparity.numerics import _kernel

    f32 = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="same length"):
        _kernel.compare(f32, np.zeros(9, np.float32), False, 0.0, 0.0)
    with pytest.raises(ValueError, match="whole elements"):  # 12 bytes read as float64
        _kernel.compare(np.zeros(3, np.float32), np.zeros(3, np.float32), True, 0.0, 0.0)
    assert _kernel.compare(np.zeros(0, np.float32), np.zeros(0, np.float32), False, 0.0, 0.0)[0] == 0


finite32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite32, finite32), min_size=1, max_size=300),
       st.sampled_from([(0.0, 0.0), (1e-5, 1.3e-6), (1e-3, 0.0), (0.0, 1e-2)]))
def test_kernel_matches_torch_route_on_any_finite_float32(pairs: list[tuple[float, float]],
                                                          tol: tuple[float, float]) -> None:
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    tolerance = Tolerance(atol=tol[0], rtol=tol[1])
    kernel = compare_tensors("t", a, b, tolerance)
    saved = metrics._kernel
    metrics._kernel = None
    try:
        torch_route = compare_tensors("t", a, b, tolerance, chunk=64)
    finally:
        metrics._kernel = saved
    assert_same(kernel, torch_route)


# --- a gathered first tensor, read in place (numerics.gathered.Gather) ---------------------------

ALL_FIELDS = tuple(f for f in TensorComparison.__dataclass_fields__)


def assert_identical(fast: TensorComparison, slow: TensorComparison) -> None:
    """Every field the same, bit for bit: the gathered route reads the copy's elements in its order."""
    for name in ALL_FIELDS:
        x, y = getattr(fast, name), getattr(slow, name)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), name


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "axis"), [((4, 40, 1024), -1), ((3, 7, 5), 1), ((2, 1030), 0), ((5, 3000), 1),
                                             ((2, 6, 33, 7), 1), ((1025, 3), 0), ((17,), 0), ((0, 4), 1)])
def test_a_gathered_tensor_gives_the_record_of_its_copy(dtype: torch.dtype, shape: tuple[int, ...], axis: int) -> None:
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    a = torch.randn(shape, generator=g, dtype=dtype)
    index = torch.randperm(shape[axis], generator=g)
    copy = a.index_select(axis, index)
    b = copy + 1e-6 * torch.randn(shape, generator=g, dtype=dtype)
    if copy.numel() > 40:
        b.view(-1)[37] += 1.0  # one real mismatch: the first index and values are reported
    for tol in (None, Tolerance(atol=1e-5, rtol=1e-5), Tolerance(atol=0, rtol=0), Tolerance(ulps=64.0),
                Tolerance(ulps=1e9), Tolerance(atol=1e-4, rtol=1e-3, statistic="max"),
                Tolerance(statistic="mean")):
        fast = compare_tensors("t", Gather(a, axis, index), b, tol, key_b="u")
        assert_identical(fast, compare_tensors("t", copy, b, tol, key_b="u"))
        assert_identical(compare_tensors("t", Gather(a, axis, index), copy, tol),
                         compare_tensors("t", copy, copy.clone(), tol))


def _woven(half: int, segments: int) -> torch.Tensor:
    """B's 2q + p is A's p * half + q in every segment: a "(two h) -> (h two)" rearrange."""
    one = torch.arange(2 * half).view(2, half).t().reshape(-1)
    return torch.cat([one + s * 2 * half for s in range(segments)])


def _split(half: int, segments: int) -> torch.Tensor:
    """B's q * half + p is A's 2p + q in every segment: RoPE's interleaved pairs into halves."""
    one = torch.arange(2 * half).view(half, 2).t().reshape(-1)
    return torch.cat([one + s * 2 * half for s in range(segments)])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["woven", "split", "woven, one element moved", "split, one element moved"])
@pytest.mark.parametrize(("half", "segments", "rows"), [(8, 1, 3), (9, 3, 5), (16, 4, 2), (64, 2, 40), (512, 1, 7),
                                                        (7, 2, 3), (100, 3, 11)])
def test_the_two_rope_layouts_read_by_shuffles_give_the_record_of_their_copy(dtype: torch.dtype, layout: str,
                                                                                 half: int, segments: int,
                                                                                 rows: int) -> None:
    """Interleaved halves and their inverse are read by vector shuffles where the CPU has AVX-512
    (runs of 16 and 8 elements; heads, tails and rows across 1024-element blocks element by
    element); an index one swap away from them is read by the general route. Every record is
    the copy's, bit for bit."""
    index = (_woven if layout.startswith("woven") else _split)(half, segments)
    if "moved" in layout:
        index = index.clone()
        index[[3, -2]] = index[[-2, 3]]
    g = torch.Generator().manual_seed(half * 100 + segments)
    a = torch.randn(rows, len(index), generator=g, dtype=dtype)
    copy = a.index_select(-1, index)
    b = copy + 1e-6 * torch.randn(copy.shape, generator=g, dtype=dtype)
    b.view(-1)[min(37, b.numel() - 1)] += 1.0
    for tol in (None, Tolerance(atol=1e-5, rtol=1e-5), Tolerance(ulps=64.0)):
        assert_identical(compare_tensors("t", Gather(a, -1, index), b, tol), compare_tensors("t", copy, b, tol))
    assert compare_tensors("t", Gather(a, -1, index), copy.clone()).status == "identical"


@needs_kernel
def test_the_gathered_route_reads_in_place_and_falls_back_to_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(8, 64)
    index = torch.arange(64).view(2, 32).t().reshape(-1)
    copy = a[:, index]
    b = copy + 1e-6

    def no_copy(self: Gather) -> torch.Tensor:
        raise AssertionError("the kernel applies: no copy is made")

    with monkeypatch.context() as m:
        m.setattr(Gather, "materialize", no_copy)
        assert compare_tensors("t", Gather(a, -1, index), b).status == "close"
        assert compare_tensors("t", Gather(a, -1, index), copy.clone()).status == "identical"
    # where it does not apply the copy is compared: NaN/Inf, other dtypes, mixed dtypes, exact mode,
    # other shapes, a transposed source (made contiguous), an index out of range
    nan = a.clone()
    nan[3, index[5]] = math.nan
    cases = [(Gather(nan, -1, index), b, None), (Gather(nan, -1, index), b, Tolerance(equal_nan=False)),
             (Gather(a.half(), -1, index), b.half(), None), (Gather(a, -1, index), b.double(), None),
             (Gather(a, -1, index), b, Tolerance(exact=True)), (Gather(a, -1, index), b[:, :10], None),
             (Gather(a.t().contiguous().t(), -1, index), b, None), (Gather(a, -1, index[:10]), b[:, :10], None)]
    for x, y, tol in cases:
        assert_identical(compare_tensors("t", x, y, tol), compare_tensors("t", x.materialize(), y, tol))
    with pytest.raises(IndexError):
        compare_tensors("t", Gather(a, -1, torch.full((64,), 64)), b)


@needs_kernel
def test_compare_gathered_refuses_bad_buffers() -> None:
    from tensorparity.numerics import _kernel

    a, b = np.zeros(12, np.float32), np.zeros(12, np.float32)
    index = np.arange(4, dtype=np.int64)
    assert _kernel.compare_gathered(a, b, index, False, 0.0, 0.0, 3, 4, 1)[1] is True
    with pytest.raises(ValueError, match="every index"):
        _kernel.compare_gathered(a, b, np.array([0, 1, 2, 4], np.int64), False, 0.0, 0.0, 3, 4, 1)
    with pytest.raises(ValueError, match="every index"):
        _kernel.compare_gathered(a, b, np.array([0, 1, 2, -1], np.int64), False, 0.0, 0.0, 3, 4, 1)
    with pytest.raises(ValueError, match="outer"):  # A holds 12 elements, not 3 x 5
        _kernel.compare_gathered(a, b, index, False, 0.0, 0.0, 3, 5, 1)
    with pytest.raises(ValueError, match="outer"):  # B holds 12, not 3 x 3
        _kernel.compare_gathered(a, b, index[:3], False, 0.0, 0.0, 3, 4, 1)


@needs_kernel
def test_same_bytes_through_memcmp_agrees_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(3000)
    cases = [(a, a.clone()), (a, a + 0.0 * a), (torch.tensor([0.0]), torch.tensor([-0.0])),
             (torch.tensor([math.nan]), torch.tensor([math.nan])), (a.bfloat16(), a.bfloat16()),
             (a.view(30, 100).t(), a.view(30, 100).t().contiguous()), (torch.zeros(0), torch.zeros(0))]
    b = a.clone()
    b[-1] += 1
    cases += [(a, b), (torch.tensor(1.0), torch.tensor(1.0)), (torch.ones(2, dtype=torch.bool), torch.ones(2) > 0)]
    for x, y in cases:
        with monkeypatch.context() as m:
            m.setattr(metrics, "_bytes", None)
            slow = same_bytes(x, y)
        assert same_bytes(x, y) == slow


# ---------------------------------------------------------------------------------------------
# compare_buffers: the same route on raw bytes (file spans), without tensors


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [Tolerance(), Tolerance(atol=1e-3), Tolerance(statistic="max"),
                                 Tolerance(statistic="mean", rtol=1e-2), Tolerance(ulps=64)],
                         ids=["default", "atol", "max", "mean", "ulps"])
def test_buffers_give_the_record_the_tensors_give(dtype: torch.dtype, tol: Tolerance) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(37, 53, generator=gen, dtype=dtype)
    b = a + 1e-6 * torch.randn(37, 53, generator=gen, dtype=dtype)
    b[11, 7] += 0.5
    resolved = tol.for_key("w", dtype)
    from_tensors = compare_tensors("w", a, b, resolved)
    from_bytes = metrics.compare_buffers("w", a.numpy().tobytes(), b.numpy().tobytes(), shape=(37, 53),
                                         dtype=str(dtype).removeprefix("torch."), tolerance=resolved)
    assert from_bytes == from_tensors
    assert from_bytes.n_mismatch >= 1 and from_bytes.first_index is not None


@needs_kernel
def test_buffers_hand_back_what_the_bytes_cannot_decide() -> None:
    resolved = Tolerance().for_key("w", "float32")
    with_nan = np.array([1.0, np.nan, 2.0], dtype=np.float32).tobytes()
    plain = np.array([1.0, 1.0, 2.0], dtype=np.float32).tobytes()
    assert metrics.compare_buffers("w", with_nan, plain, shape=(3,), dtype="float32", tolerance=resolved) is None
    misaligned = bytearray(13)
    assert metrics.compare_buffers("w", memoryview(misaligned)[1:], memoryview(misaligned)[1:], shape=(3,),
                                   dtype="float32", tolerance=resolved) is None
    assert metrics.compare_buffers("w", plain, plain, shape=(3,), dtype="int32",
                                   tolerance=Tolerance().for_key("w", "int32")) is None
    assert metrics.compare_buffers("w", plain, plain, shape=(3,), dtype="float32",
                                   tolerance=Tolerance(exact=True).for_key("w", "float32")) is None


# ---------------------------------------------------------------------------------------------
# first_outside: a comparison's elementwise verdict, found by scanning to the first failing element


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3000), noise=st.sampled_from([0.0, 1e-8, 1e-6, 1e-4, 1e-2]),
       bump=st.one_of(st.none(), st.floats(1e-7, 10.0)), at=st.integers(0, 10_000),
       ulps=st.sampled_from([None, 4.0, 64.0, 1e5]), atol=st.sampled_from([0.0, 1e-6, 1e-3]),
       double=st.booleans(), seed=st.integers(0, 2**16))
def test_first_outside_gives_the_verdict_compare_buffers_gives(n: int, noise: float, bump: float | None, at: int,
                                                                ulps: float | None, atol: float, double: bool,
                                                                seed: int) -> None:
    dtype = np.float64 if double else np.float32
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)).astype(dtype)
    b = (a + noise * rng.standard_normal(n)).astype(dtype)
    if bump is not None:
        b[at % n] += dtype(bump)
    name = "float64" if double else "float32"
    resolved = Tolerance(atol=atol, rtol=1e-5, ulps=ulps).for_key("w", name)
    record = metrics.compare_buffers("w", a.tobytes(), b.tobytes(), shape=(n,), dtype=name, tolerance=resolved)
    assert record is not None
    assert metrics.first_outside(a.tobytes(), b.tobytes(), name, resolved) is (not record.passed)
    # The first `limit` elements at the atol not raised: outside there iff some mismatch lies
    # among them at that atol.
    limit = max(1, n // 3)
    plain = Tolerance(atol=atol, rtol=1e-5).for_key("w", name)
    head = metrics.compare_buffers("w", a[:limit].tobytes(), b[:limit].tobytes(), shape=(limit,), dtype=name,
                                   tolerance=plain)
    assert metrics.first_outside(a.tobytes(), b.tobytes(), name, resolved, limit, scaled=False) is (not head.passed)


@needs_kernel
def test_first_outside_cannot_say_where_a_nan_or_an_inf_comes_first() -> None:
    resolved = Tolerance().for_key("w", "float32")
    plain = np.array([1.0, 1.0, 2.0], dtype=np.float32)
    for bad in (np.nan, np.inf):
        other = plain.copy()
        other[1] = bad
        assert metrics.first_outside(other.tobytes(), plain.tobytes(), "float32", resolved) is None
        assert metrics.first_outside(plain.tobytes(), other.tobytes(), "float32", resolved) is None
    inf_b = plain.copy()
    inf_b[2] = np.inf  # max|b| not finite: the raised atol is unknown
    assert metrics.first_outside(plain.tobytes(), inf_b.tobytes(), "float32", Tolerance(ulps=4).for_key("w", "float32")) is None
    assert metrics.first_outside(plain.tobytes(), plain.tobytes(), "float32", resolved) is False
    assert metrics.first_outside(plain.tobytes(), plain.tobytes(), "int32", resolved) is None
    assert metrics.first_outside(plain.tobytes(), plain.tobytes()[:8], "float32", resolved) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["rising", "falling"])
def test_ratios_that_grow_by_an_ulp_at_a_time_are_all_seen(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                           order: str) -> None:
    # The vector loops let a candidate ratio through to the exact cross-multiplication only where
    # it beats a threshold just below the best so far: ratios a step of one ulp apart, across
    # lanes and blocks, must still end at the largest (rising), and never at a later equal or
    # smaller one (falling).
    n = 5000
    b = torch.ones(n, dtype=dtype)
    eps = torch.finfo(dtype).eps
    steps = torch.arange(n, dtype=torch.float64) * eps
    diff = (1e-3 * (1 + steps)).to(dtype)
    a = b + (diff if order == "rising" else diff.flip(0))
    kernel, torch_route = both_routes(monkeypatch, a, b)
    assert_same(kernel, torch_route)
    assert kernel.max_rel == float((a.double() - b.double()).abs().max())
    assert kernel.required_rtol == torch_route.required_rtol > 0
