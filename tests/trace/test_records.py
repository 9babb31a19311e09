"""Statistics and content fingerprints of recorded tensors."""

from __future__ import annotations

import math
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from tensorparity.checkpoint.tracefolder import stats
from tensorparity.checkpoint.tracefolder.records import fingerprint, same_content, tensor_stats
from tensorparity.checkpoint.tracefolder.stats import _SMALL_BYTES, _bits, _column_sums, _fingerprint_words, _passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int8, torch.bool, torch.complex64])
@pytest.mark.parametrize("n", [1, 3, 1024, 4099])
def test_equal_tensors_agree_and_any_changed_element_or_swap_disagrees(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 50).to(dtype) if dtype != torch.bool else torch.rand(n, generator=g) > 0.5
    assert fingerprint(t) == fingerprint(t.clone()) and fingerprint(t).startswith("fp2:")
    if n > 1:
        changed = t.clone()
        changed[n // 2] = changed[n // 2] + 1 if dtype != torch.bool else ~changed[n // 2]
        assert fingerprint(changed) != fingerprint(t)
        swapped = t.clone()
        swapped[[0, n - 1]] = t[[n - 1, 0]]
        assert (fingerprint(swapped) != fingerprint(t)) or bool((t[0] == t[n - 1]).all())


def test_a_transposed_or_permuted_weight_and_an_odd_view_are_told_apart() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    assert fingerprint(w) != fingerprint(w.t().contiguous())
    assert fingerprint(w) != fingerprint(w[torch.randperm(64, generator=torch.Generator().manual_seed(1))])
    odd = torch.randn(1001)[1:]  # a storage offset of 4 bytes: no int64 view, the fingerprint still works
    assert fingerprint(odd) == fingerprint(odd.clone())
    assert fingerprint(w) == fingerprint(w.reshape(48, 64))  # the same numbers in the same order


def test_fingerprints_of_other_versions_are_never_compared() -> None:
    assert same_content("fp2:ab", "fp2:ab") is True and same_content("fp2:ab", "fp2:cd") is False
    assert same_content("fp1:ab", "fp2:cd") is None and same_content("", "fp2:cd") is None


def test_statistics_skip_nan_and_inf_and_agree_with_float64() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2)) * 3 + 1
    s = tensor_stats(x)
    ref = x.double()
    assert s.mean == pytest.approx(float(ref.mean()), rel=1e-5)
    assert s.std == pytest.approx(float(ref.std(unbiased=False)), rel=1e-5)
    assert s.norm == pytest.approx(float(ref.norm()), rel=1e-6)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    s = tensor_stats(x)
    assert (s.nan, s.inf) == (1, 2) and s.min == pytest.approx(float(x[3:].min()))


def test_fingerprints_never_change_between_versions() -> None:
    # Traces written by earlier releases are compared with new ones: fp2 is pinned bit for bit,
    # for the small-tensor route (NumPy) and the large one (torch), int64 and int32 words.
    assert fingerprint(torch.arange(3000, dtype=torch.float32)) == "fp2:839101914173400088b78a4c5db5c000"
    assert fingerprint(torch.arange(100_001, dtype=torch.float32)) == "fp2:000000bc67daa80014779c8f7f7e5800"
    assert 100_001 * 4 > _SMALL_BYTES
    # Tall grids whose column sums are folded 16 rows (800 rows) or 8 rows (200) at a time, and one
    # with a tail: the same fingerprints as the plain column sums of fp2's first release gave.
    pins = {1_638_400: "fp2:a68382f4c86716832cb30b4dbbb10406", 409_600: "fp2:f23ad083dc86eb1b420fe69c05eccc68",
            1_644_550: "fp2:279679a96b7513a834179852c43b29fe"}
    for n, pin in pins.items():
        assert fingerprint((torch.arange(n, dtype=torch.int64) * 2654435761 % 1000003).to(torch.float32) / 7) == pin


@pytest.mark.parametrize("rows", [1, 63, 64, 72, 128, 200, 800, 801])
def test_folded_column_sums_are_the_column_sums(rows: int) -> None:
    grid = torch.randint(-2**62, 2**62, (rows, 1024), generator=torch.Generator().manual_seed(rows))
    assert torch.equal(_column_sums(grid), grid.sum(0))  # wrapping int64 sums, in any order
    assert np.array_equal(_column_sums(grid.numpy()), grid.numpy().sum(0))


@pytest.mark.parametrize("n", [5, 1023, 1024, 1025, 4096 * 3 + 7, 70_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_the_numpy_and_the_torch_route_agree(n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 1e4).to(dtype)
    bits = _bits(t)
    if bits.element_size() < 4:
        bits = bits.to(torch.int32)
    wide = bits.element_size() == 8
    cpu = torch.device("cpu")
    assert _fingerprint_words(bits.numpy(), cpu, True, wide) == _fingerprint_words(bits, cpu, False, wide)
    x = t.to(torch.float64) if not t.is_floating_point() else t.float()
    assert _passes(x.numpy()) == pytest.approx(_passes(x), rel=1e-5)


def test_large_tensors_changed_swapped_or_expanded() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 400, 256, generator=g)  # 1.6 MB: the torch route
    assert t.numel() * 4 > _SMALL_BYTES
    assert fingerprint(t) == fingerprint(t.clone())
    changed = t.clone()
    changed[2, 100, 7] += 1e-3
    swapped = t.clone()
    swapped[0, 0, [0, 2]] = t[0, 0, [2, 0]]  # two channels inside one 8 KB block
    rows = t[torch.tensor([1, 0, 2, 3])]  # batch items reordered: whole blocks move
    assert len({fingerprint(x) for x in (t, changed, swapped, rows)}) == 4
    expanded = torch.randn(1, 300_000, generator=g).expand(3, 300_000)  # a stride-0 gradient
    assert fingerprint(expanded) == fingerprint(expanded.contiguous())
    assert tensor_stats(expanded) == tensor_stats(expanded.contiguous())
    strided = t.transpose(1, 2)
    assert tensor_stats(strided) == tensor_stats(strided.contiguous())
    assert tensor_stats(strided).mean == pytest.approx(float(t.double().mean()), rel=1e-4, abs=1e-6)


def test_numpy_route_statistics_with_nan_and_integers() -> None:
    x = torch.tensor([1.0, float("nan"), 3.0, float("-inf")])
    s = tensor_stats(x)
    assert (s.min, s.max, s.mean, s.nan, s.inf) == (1.0, 3.0, 2.0, 1, 1)
    i = tensor_stats(torch.tensor([2, 4], dtype=torch.int32))
    assert (i.min, i.max, i.mean, i.std) == (2.0, 4.0, 3.0, 1.0)
    assert isinstance(_passes(np.ones(3, dtype=np.float32))[0], float)


needs_accelerator = pytest.mark.skipif(stats._fused is None, reason="the C accelerator is not built here")


def test_the_accelerator_is_built_where_a_c_compiler_is() -> None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the torch route serves alone")
    from tensorparity.checkpoint.tracefolder import _fused

    assert callable(_fused.measure)


@needs_accelerator
@pytest.mark.parametrize("n", [2, 1000, 2048, 2048 * 3 + 2, 409_600, 409_600 + 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_accelerator_agrees_with_the_torch_route(n: int, dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 1).to(dtype)
    assert stats._fused_stats(t)[0] is not None  # one read in C, not the torch route
    fast = tensor_stats(t)
    assert fast.hash == fingerprint(t)  # fingerprint() itself never takes the accelerator
    monkeypatch.setattr(stats, "_fused", None)
    slow = tensor_stats(t)
    assert (fast.numel, fast.min, fast.max, fast.nan, fast.inf, fast.hash) == \
        (slow.numel, slow.min, slow.max, slow.nan, slow.inf, slow.hash)
    assert fast.mean == pytest.approx(slow.mean, rel=1e-5, abs=1e-6)
    assert fast.std == pytest.approx(slow.std, rel=1e-5) and fast.norm == pytest.approx(slow.norm, rel=1e-6)


@needs_accelerator
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bytes", [8 * 1024 * 8, 8 * 1024 * 37 + 24, 8 * 1024 * 300])
def test_the_vector_loop_measures_as_the_portable_loop(dtype: torch.dtype, n_bytes: int) -> None:
    # The AVX2 loop (where this CPU has one) against the portable one: the fingerprint bit for bit,
    # min and max exactly (NaN skipped by both), the sums to rounding; the copy, streamed to an
    # aligned destination or stored to an unaligned one, byte for byte.
    t = torch.randn(n_bytes // dtype.itemsize, generator=torch.Generator().manual_seed(n_bytes)).to(dtype) * 7 - 1
    t[5], t[21] = -1e6, float("nan")  # the smallest, then a NaN in the same vector lane
    t[n_bytes // dtype.itemsize - 3] = 1e6  # the largest, in the last row or the tail
    data = t.numpy()
    portable = stats._fused.measure(data, dtype == torch.float64, None, True)
    room = np.zeros(n_bytes + 64, np.uint8)
    start = room.ctypes.data % 64
    for offset in (-start % 64, -start % 64 + 8):  # 64-byte aligned (streamed), then 8 past it
        dst = room[offset:offset + n_bytes]
        vector = stats._fused.measure(data, dtype == torch.float64, dst)
        assert vector[4:] == portable[4:] and vector[:2] == portable[:2] == (-1e6, 1e6)
        assert math.isnan(vector[2]) and math.isnan(portable[2])  # the NaN reaches the sums
        assert dst.tobytes() == data.tobytes()
    t[21] = 0.0
    data = t.numpy()
    vector, portable = stats._fused.measure(data, dtype == torch.float64), \
        stats._fused.measure(data, dtype == torch.float64, None, True)
    assert vector[2] == pytest.approx(portable[2], rel=1e-6) and vector[3] == pytest.approx(portable[3], rel=1e-6)
    assert vector[3] == pytest.approx(float(t.double() @ t.double()), rel=1e-6)


@needs_accelerator
@pytest.mark.parametrize("portable", [False, True])
def test_a_copy_into_spans_laid_end_to_end(portable: bool) -> None:
    # A trace writer's blocks: spans of any length (one empty, one cutting a row and a vector in
    # two, the last holding the tail), aligned or not; the copy lands whole, the results unchanged.
    t = torch.randn(2048 * 5 + 6, generator=torch.Generator().manual_seed(3))
    data = t.numpy()
    alone = stats._fused.measure(data, False, None, portable)
    room = np.zeros(data.nbytes + 256, np.uint8)
    base = -room.ctypes.data % 64
    cuts = [0, 8192 + 40, 8192 + 40, 3 * 8192 + 8, data.nbytes]  # an empty span between the first two
    spans = [room[base + a + 8 * i:base + b + 8 * i] for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    assert stats._fused.measure(data, False, spans, portable) == alone
    assert b"".join(s.tobytes() for s in spans) == data.tobytes()
    with pytest.raises(ValueError, match="as long as data"):
        stats._fused.measure(data, False, spans[:-1], portable)
    with pytest.raises((TypeError, BufferError)):
        stats._fused.measure(data, False, [bytes(data.nbytes)], portable)  # read-only


@needs_accelerator
def test_the_accelerator_leaves_nan_inf_and_misaligned_views_to_the_exact_route() -> None:
    t = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    t[[7, 4000]] = torch.tensor([float("nan"), float("inf")])
    assert stats._fused_stats(t)[0] is None
    s = tensor_stats(t)
    assert (s.nan, s.inf) == (1, 1) and s.max == pytest.approx(float(t[torch.isfinite(t)].max()))
    odd = torch.randn(3001)[1:]  # starts 4 bytes into its storage: no aligned int64 words
    assert stats._fused_stats(odd)[0] is None
    slow, fast = tensor_stats(odd), tensor_stats(odd.clone())  # the torch route, then the accelerator
    assert (slow.hash, slow.min, slow.max) == (fast.hash, fast.min, fast.max)
    assert slow.mean == pytest.approx(fast.mean, rel=1e-5, abs=1e-6) and slow.norm == pytest.approx(fast.norm)
    with pytest.raises(ValueError, match="whole number of words"):
        stats._fused.measure(torch.zeros(3).numpy(), False)
    misaligned = np.zeros(8 * 1024 + 8, np.uint8)[4:4 + 8 * 1024]  # 4 bytes past an aligned start
    with pytest.raises(ValueError, match="8-byte aligned"):
        stats._fused.measure(misaligned, False)
    with pytest.raises(ValueError, match="dst must be as long as data"):
        stats._fused.measure(torch.zeros(4096).numpy(), False, np.empty(100, np.uint8))