"""compare_tensors: every statistic checked against a direct float64 computation."""

import math

import pytest
import torch

from tensorparity.numerics import Tolerance, compare_tensors, same_bytes


def test_identical_bytes_short_circuit() -> None:
    a = torch.randn(100, 7)
    r = compare_tensors("w", a, a.clone())
    assert r.status == "identical" and r.passed and r.max_abs == 0 and r.numel == 700


def test_metrics_match_direct_computation() -> None:
    torch.manual_seed(0)
    a = torch.randn(300, 50)
    b = a + 1e-3 * torch.randn(300, 50)
    r = compare_tensors("w", a, b, Tolerance(atol=1e-3, rtol=0), chunk=1000)  # many chunks
    a64, b64 = a.double(), b.double()
    diff = (a64 - b64).abs()
    assert r.max_abs == pytest.approx(float(diff.max()))
    assert r.mean_abs == pytest.approx(float(diff.mean()))
    assert r.max_rel == pytest.approx(float((diff / b64.abs()).max()))
    cos = float((a64 * b64).sum() / (a64.norm() * b64.norm()))
    assert r.cosine == pytest.approx(cos)
    bad = diff > 1e-3
    assert r.n_mismatch == int(bad.sum())
    first = int(bad.flatten().nonzero()[0])
    assert r.first_index == (first // 50, first % 50)
    assert r.first_a == pytest.approx(float(a.flatten()[first]))
    assert r.first_b == pytest.approx(float(b.flatten()[first]))
    assert r.required_atol == pytest.approx(float(diff.max()))
    assert not r.passed and r.status == "mismatch"


def test_required_tolerance_would_pass() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.1, 2.0, 3.3])
    r = compare_tensors("w", a, b, Tolerance(atol=0.0, rtol=0.0))
    assert not r.passed
    assert compare_tensors("w", a, b, Tolerance(atol=r.required_atol * 1.0000001, rtol=0.0)).passed
    assert compare_tensors("w", a, b, Tolerance(atol=0.0, rtol=r.required_rtol * 1.0000001)).passed


def test_shapes_are_reported_never_broadcast() -> None:
    r = compare_tensors("w", torch.ones(3, 1), torch.ones(1, 3))
    assert r.status == "shape" and not r.passed and r.shape_a == (3, 1) and r.shape_b == (1, 3)


def test_dtypes_differ_values_compared_after_promotion() -> None:
    a = torch.randn(64)
    r = compare_tensors("w", a, a.to(torch.bfloat16))
    assert r.dtype_differs and r.dtype_a == "float32" and r.dtype_b == "bfloat16"
    assert r.passed and r.status == "close"  # bf16 default tolerance applies: the looser dtype
    assert r.tolerance.rtol == pytest.approx(1.6e-2)


def test_nan_equality_switch_and_positions() -> None:
    a = torch.tensor([1.0, math.nan, 3.0])
    assert compare_tensors("w", a, a.clone() + 0.0).passed
    strict = compare_tensors("w", a, a + 0.0, Tolerance(equal_nan=False))
    assert not strict.passed and strict.nan_a == 1 and strict.nan_agree
    moved = compare_tensors("w", a, torch.tensor([math.nan, 2.0, 3.0]))
    assert not moved.passed and not moved.nan_agree and moved.first_index == (0,)


def test_infinities_must_agree_in_sign() -> None:
    a = torch.tensor([math.inf, 1.0])
    assert compare_tensors("w", a, torch.tensor([math.inf, 1.0 + 1e-9])).passed
    r = compare_tensors("w", a, torch.tensor([-math.inf, 1.0]))
    assert not r.passed and not r.inf_agree


def test_exact_mode_fails_on_one_ulp() -> None:
    a = torch.ones(4)
    b = a.clone()
    b[2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert compare_tensors("w", a, b).passed
    r = compare_tensors("w", a, b, Tolerance(exact=True))
    assert not r.passed and r.first_index is None or r.max_abs > 0


def test_integers_compare_exactly_beyond_float_precision() -> None:
    a = torch.tensor([2**60, 5], dtype=torch.int64)
    b = torch.tensor([2**60 + 1, 5], dtype=torch.int64)
    r = compare_tensors("step", a, b)
    assert not r.passed and r.n_mismatch == 1 and r.first_index == (0,)


def test_statistics_max_and_mean() -> None:
    a = torch.zeros(1000)
    b = torch.zeros(1000)
    b[0] = 1.0  # one large outlier
    assert not compare_tensors("w", a, b, Tolerance(atol=0.01, rtol=0)).passed
    assert compare_tensors("w", a, b, Tolerance(atol=0.01, rtol=0, statistic="mean")).passed
    assert not compare_tensors("w", a, b, Tolerance(atol=0.01, rtol=0, statistic="max")).passed


def test_complex_bool_and_empty() -> None:
    z = torch.randn(5, dtype=torch.complex64)
    r = compare_tensors("z", z, z * (1 + 1e-3j))
    assert not r.passed and r.max_abs > 0
    assert compare_tensors("m", torch.tensor([True, False]), torch.tensor([True, True])).n_mismatch == 1
    assert compare_tensors("e", torch.empty(0, 3), torch.empty(0, 3)).status == "identical"


def test_strided_inputs_and_same_bytes() -> None:
    a = torch.randn(8, 6)
    assert compare_tensors("t", a.t(), a.t().contiguous()).status == "identical"
    assert same_bytes(a.t(), a.t().contiguous())
    assert not same_bytes(a, a.to(torch.float64))


def test_summary_and_json_record() -> None:
    r = compare_tensors("w", torch.tensor([1.0, math.inf]), torch.tensor([1.5, 1.0]))
    assert "first at [1]" in r.summary() or "first at [0]" in r.summary()
    d = r.to_dict()
    assert d["shape_a"] == [2] and isinstance(d["max_rel"], (float, str))
