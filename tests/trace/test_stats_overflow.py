"""Statistics of tensors whose float32 sums would overflow: attention masks filled with
``finfo(float32).min``, diverged values of 1e19. Every route (the C accelerator, NumPy for small
CPU tensors, torch for large ones) measures them in float64 and agrees with a float64 reference."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tensorparity.checkpoint.tracefolder import stats
from tensorparity.checkpoint.tracefolder.records import fingerprint, tensor_stats

F32 = torch.finfo(torch.float32)
SIZES = [100, 2048 * 3 + 2, 300_000]  # NumPy (small), an odd tail for the accelerator, torch (large)
ROUTES = ["accelerator", "plain"]


def filled(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    normal = torch.randn(n, generator=g)
    every_third = torch.arange(n) % 3 == 0
    return {
        "finfo.min": torch.full((n,), F32.min),
        "finfo.max": torch.full((n,), F32.max),
        "2e19": torch.full((n,), 2e19),
        "-2e19": torch.full((n,), -2e19),
        "mask": torch.where(every_third, torch.tensor(F32.min), torch.zeros(n)),  # an additive attention mask
        "mask+normal": torch.where(every_third, torch.tensor(F32.min), normal),
        "min+max": torch.where(every_third, torch.tensor(F32.min), torch.tensor(F32.max)),
        "±2e19+normal": torch.where(every_third, normal.sign() * 2e19, normal),
    }[kind]


def reference(x: torch.Tensor) -> tuple[float, float, float]:
    d = x.double()
    d = d[torch.isfinite(d)]
    return float(d.mean()), float(d.std(unbiased=False)), float(d.norm())


def measured(x: torch.Tensor, route: str, monkeypatch: pytest.MonkeyPatch) -> stats.TensorStats:
    if route == "plain":
        monkeypatch.setattr(stats, "_fused", None)
    elif stats._fused is None:
        pytest.skip("the C accelerator is not built here")
    return tensor_stats(x)


@pytest.mark.filterwarnings("error")  # NumPy's "overflow encountered in reduce/dot" would be an error
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["finfo.min", "finfo.max", "2e19", "-2e19", "mask", "mask+normal", "min+max",
                                  "±2e19+normal"])
def test_float32_values_whose_sums_overflow_float32_agree_with_float64(
        kind: str, n: int, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = filled(kind, n)
    s = measured(x, route, monkeypatch)
    mean, std, norm = reference(x)
    peak = float(x.abs().max())
    assert all(math.isfinite(v) for v in (s.mean, s.std, s.norm)), s
    assert (s.numel, s.min, s.max, s.nan, s.inf) == (n, float(x.min()), float(x.max()), 0, 0)
    assert s.mean == pytest.approx(mean, rel=1e-9, abs=1e-12 * peak)
    assert s.std == pytest.approx(std, rel=1e-9, abs=1e-12 * peak)
    assert s.norm == pytest.approx(norm, rel=1e-9)
    assert s.hash == fingerprint(x)  # the fingerprint is untouched by the float64 route
    if kind in ("finfo.min", "finfo.max", "2e19", "-2e19"):
        assert s.std == 0.0 and s.norm == pytest.approx(peak * math.sqrt(n), rel=1e-12)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["mask", "±2e19+normal", "finfo.max"])
def test_the_accelerator_and_the_plain_routes_give_the_same_statistics(
        kind: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if stats._fused is None:
        pytest.skip("the C accelerator is not built here")
    x = filled(kind, n)
    assert stats._fused_stats(x)[0] is not None  # the accelerator measured it, not the fallback
    fast = tensor_stats(x)
    monkeypatch.setattr(stats, "_fused", None)
    assert tensor_stats(x) == fast  # the same float64 moments, bit for bit
    assert tensor_stats(x, with_hash=False) == replace(fast, hash="")


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", SIZES)
def test_nan_and_inf_are_still_counted_beside_overflowing_values(
        n: int, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = filled("mask+normal", n)
    x[[1, n - 1]] = torch.tensor([float("nan"), float("-inf")])
    s = measured(x, route, monkeypatch)
    mean, std, norm = reference(x)
    finite = x[torch.isfinite(x)]
    assert (s.nan, s.inf, s.min, s.max) == (1, 1, float(finite.min()), float(finite.max()))
    assert s.mean == pytest.approx(mean, rel=1e-9) and s.std == pytest.approx(std, rel=1e-9)
    assert s.norm == pytest.approx(norm, rel=1e-9)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_extremes(dtype: torch.dtype) -> None:
    low = float(torch.finfo(dtype).min)
    s = tensor_stats(torch.full((5000,), low, dtype=dtype))  # bfloat16's min squares past float32's max
    assert math.isfinite(s.norm) and s.mean == pytest.approx(low, rel=1e-6)
    assert s.std <= 1e-3 * abs(low) and s.norm == pytest.approx(abs(low) * math.sqrt(5000), rel=1e-6)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", [100, 300_000])
def test_float64_values_beyond_1e154_are_scaled_not_overflowed(
        n: int, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e300
    s = measured(x, route, monkeypatch)
    scaled = x / 1e300  # the reference, computed where it cannot overflow
    assert s.mean == pytest.approx(float(scaled.mean()) * 1e300, rel=1e-9)
    assert s.std == pytest.approx(float(scaled.std(unbiased=False)) * 1e300, rel=1e-9)
    assert s.norm == pytest.approx(float(scaled.norm()) * 1e300, rel=1e-9)
    huge = measured(torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64), route, monkeypatch)
    assert huge.mean == torch.finfo(torch.float64).max and huge.std == 0.0
    assert huge.norm == math.inf  # twice the largest float64: not representable


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", SIZES)
def test_ordinary_tensors_never_pay_for_the_float64_route(
        n: int, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the float64 route was taken")

    monkeypatch.setattr(stats, "_wide_moments", refuse)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e6  # large activations, far from overflow
    s = measured(x, route, monkeypatch)
    assert s.norm == pytest.approx(float(x.double().norm()), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_route_agrees_with_the_cpu_route() -> None:
    for kind in ("mask", "±2e19+normal", "finfo.max"):
        x = filled(kind, 300_000)
        cpu, cuda = tensor_stats(x), tensor_stats(x.cuda())
        assert (cuda.min, cuda.max, cuda.hash) == (cpu.min, cpu.max, cpu.hash)
        for field in ("mean", "std", "norm"):
            assert getattr(cuda, field) == pytest.approx(getattr(cpu, field), rel=1e-9, abs=1e-12 * cpu.norm)
