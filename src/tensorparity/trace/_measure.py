"""How far apart two records are: the relative error of a comparison, and comparisons by
statistics when a side stored no tensor.

**Relative error.** A comparison's relative error is its largest absolute error over the largest
magnitude of B's tensor (from B's recorded statistics): ``max|a - b| / max|b|``. Under statistics
(a side stored no tensors), it is the largest difference of min/max/mean/std over ``max|b|``, or of
the norm over B's norm.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tensorparity.checkpoint.tracefolder.records import TensorStats, TraceRecord
from tensorparity.errors import TensorParityError
from tensorparity.numerics import TensorComparison, Tolerance, compare_tensors

__all__ = ["compare_stats", "relative_error", "stats_error"]


def _magnitude(stats: TensorStats | None) -> float | None:
    if stats is None or not (math.isfinite(stats.min) and math.isfinite(stats.max)):
        return None
    return max(abs(stats.min), abs(stats.max))


def relative_error(t: TensorComparison, stats_b: TensorStats | None) -> float:
    """``max|a - b| / max|b|`` of a comparison (``inf`` for shape or NaN/Inf-place differences).

    Example:
        >>> from tensorparity.checkpoint.tracefolder.records import tensor_stats
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
        >>> relative_error(compare_tensors("x", a, b), tensor_stats(b))
        0.5
    """
    if t.status == "identical":
        return 0.0
    if t.status == "shape" or not (t.nan_agree and t.inf_agree) or not math.isfinite(t.max_abs):
        return math.inf
    scale = _magnitude(stats_b)
    if scale is None:
        return t.max_abs
    return t.max_abs / scale if scale > 0 else (0.0 if t.max_abs == 0 else math.inf)


def stats_error(t: TensorComparison, sa: TensorStats | None, sb: TensorStats | None) -> float:
    if t.status == "identical":
        return 0.0
    if t.status == "shape" or sa is None or sb is None:
        return math.inf
    scale = _magnitude(sb) or _magnitude(sa) or 0.0
    diffs = [abs(getattr(sa, k) - getattr(sb, k)) for k in ("min", "max", "mean", "std")]
    errs = [d / scale if scale > 0 else (0.0 if d == 0 else math.inf) for d in diffs]
    errs.append(abs(sa.norm - sb.norm) / sb.norm if sb.norm > 0 else (0.0 if sa.norm == 0 else math.inf))
    if sa.nan != sb.nan or sa.inf != sb.inf:
        return math.inf
    return max(e if e == e else math.inf for e in errs)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


_STAT_FIELDS = ("min", "max", "mean", "std", "norm", "nan", "inf")


def compare_stats(key: str, ra: TraceRecord, rb: TraceRecord, tolerance: Tolerance | None = None, *,
                  stats_a: TensorStats | None = None, stats_b: TensorStats | None = None,
                  key_b: str | None = None) -> TensorComparison:
    """Compare two records by their statistics, when a side stored no tensor.

    Equal content hashes mean identical tensors. Otherwise min, max, mean, std, norm and the
    NaN/Inf counts are compared as a vector under the tolerance the records' dtypes resolve to;
    equal statistics give ``close``, never ``identical``.

    Example:
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord, tensor_stats
        >>> x = torch.arange(4.0)
        >>> def rec(t):
        ...     return TraceRecord(0, "fc", 0, "Linear", "output", "", (4,), "float32", "cpu", tensor_stats(t), False)
        >>> compare_stats("fc/0/output", rec(x), rec(x)).status, compare_stats("fc/0/output", rec(x), rec(x + 1)).status
        ('identical', 'mismatch')
    """
    sa, sb = stats_a or ra.stats, stats_b or rb.stats
    tol = (tolerance or Tolerance()).for_key(key, _dtype(ra.dtype), _dtype(rb.dtype))
    scale = _magnitude(sb) if tol.ulps else None
    if scale:
        # ulps are of the tensor's own scale (its largest magnitude), not of the statistics
        # vector's, whose norm entry would loosen min, max and mean by √numel.
        eps = max(torch.finfo(_dtype(d)).eps if _dtype(d).is_floating_point else 0.0 for d in (ra.dtype, rb.dtype))
        atol = max(tol.atol, tol.ulps * eps * scale)
        tol = replace(tol, atol=atol, ulps=0.0,
                      source=tol.source if atol == tol.atol else f"{tol.source}, {tol.ulps:.3g} ulp of max|b|")
    common = dict(key=key, key_b=key_b if key_b != key else None, shape_a=ra.shape, shape_b=rb.shape,
                  dtype_a=ra.dtype, dtype_b=rb.dtype, tolerance=tol, numel=math.prod(ra.shape))
    if ra.shape != rb.shape:
        return TensorComparison(passed=False, status="shape", **common)  # type: ignore[arg-type]
    if sa is None or sb is None:
        raise TensorParityError(f"record {key!r} can be compared neither by value nor by statistics: a side "
                                "stored no tensor and no statistics", fix="capture both runs in full or stats mode")
    if sa.hash and sa.hash == sb.hash and ra.dtype == rb.dtype:
        return TensorComparison(passed=True, status="identical", **common)  # type: ignore[arg-type]
    va = torch.tensor([float(getattr(sa, f)) for f in _STAT_FIELDS], dtype=torch.float64)
    vb = torch.tensor([float(getattr(sb, f)) for f in _STAT_FIELDS], dtype=torch.float64)
    result = compare_tensors(key, va, vb, tol)
    return replace(result, status="close" if result.passed else "mismatch", n_mismatch=0, frac_mismatch=0.0,
                   first_index=None, first_a=None, first_b=None, nan_a=sa.nan, nan_b=sb.nan, inf_a=sa.inf,
                   inf_b=sb.inf, nan_agree=sa.nan == sb.nan, inf_agree=sa.inf == sb.inf, **common)
