"""Compare two tensors: bytes first, then error statistics computed chunk by chunk in float64.

Pure tensor math, no I/O. Memory stays bounded by the chunk size (a few float64 buffers of
``CHUNK`` elements) on top of the two inputs, whatever the tensors' size. Two float32 (or two
float64) CPU tensors whose elements are all finite go through the optional C kernel
(``_kernel.c``): one read per element for the same float64 arithmetic, no buffers at all.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tensorparity._dtypes import dtype_info, dtype_name
from tensorparity.numerics.gathered import Gather
from tensorparity.numerics.results import TensorComparison
from tensorparity.numerics.tolerance import ResolvedTolerance, Tolerance

try:  # the optional C kernel (setup.py builds it where a compiler is found)
    from tensorparity.numerics import _kernel
except ImportError:  # pragma: no cover - exercised only where no compiler was found
    _kernel = None
try:  # memcmp with the GIL released (checkpoint/_bytes.c, built with the kernel)
    from tensorparity.checkpoint import _bytes
except ImportError:  # pragma: no cover - exercised only where no compiler was found
    _bytes = None

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK", "buffers_comparable", "compare_buffers", "compare_tensors", "first_outside", "same_bytes"]

CHUNK = 1 << 18  # elements per chunk: 2 MB per float64 buffer, a dozen of them at most


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold identical bytes (NaNs included).

    Example:
        >>> import torch
        >>> same_bytes(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
        True
    """
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a, b = a.resolve_conj().resolve_neg(), b.resolve_conj().resolve_neg()  # bytes, not lazy views
    if b.device != a.device:
        b = b.to(a.device)
    bytes_a, bytes_b = a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
    if _bytes is not None and a.device.type == "cpu":
        # memcmp, stopping at the first difference (most unequal tensors differ in their first
        # bytes), where torch.equal may read on past it.
        return bool(_bytes.same(bytes_a.numpy(), bytes_b.numpy()))
    return torch.equal(bytes_a, bytes_b)


@dataclass
class _Acc:
    """Running aggregates over chunks."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    sum_absb: float = 0.0
    max_absb: float = 0.0
    n_finite: int = 0
    dot: float = 0.0
    norm_a: float = 0.0
    norm_b: float = 0.0
    n_bad: int = 0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    nan_agree: bool = True
    inf_agree: bool = True
    nonfinite_bad: bool = False
    first: int | None = None
    req_atol: float = 0.0
    req_rtol: float = 0.0


def _work(x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.is_complex():
        return x.to(torch.complex128)
    return x.to(torch.float64)


def _equal_chunk(acc: _Acc, b: torch.Tensor) -> None:
    """A chunk whose values are equal (and NaN-free): only the sums of B's magnitudes move."""
    import torch

    b64 = _work(b)
    absb = b64.abs()
    inf = torch.isinf(absb)
    n_inf = int(inf.sum())
    acc.inf_a += n_inf
    acc.inf_b += n_inf
    if n_inf:
        absb = torch.where(inf, 0.0, absb)
    acc.n_finite += b64.numel() - n_inf
    acc.sum_absb += float(absb.sum())
    acc.max_absb = max(acc.max_absb, float(absb.max()))
    square = float((absb * absb).sum())
    acc.dot += square
    acc.norm_a += square
    acc.norm_b += square


def _chunk(acc: _Acc, a: torch.Tensor, b: torch.Tensor, start: int, tol: ResolvedTolerance, integer: bool) -> None:
    import torch

    if a.dtype == b.dtype and not tol.exact and torch.equal(a, b):
        # Most chunks of a mismatching tensor are untouched: skip the error arithmetic.
        _equal_chunk(acc, b)
        return
    a64, b64 = _work(a), _work(b)
    if not (tol.exact or integer or a64.is_complex()) and math.isfinite(float(a64.sum()) + float(b64.sum())):
        _finite_chunk(acc, a64, b64, start, tol)
        return
    na, nb = torch.isnan(a64), torch.isnan(b64)
    ia, ib = torch.isinf(a64), torch.isinf(b64)
    acc.nan_a += int(na.sum())
    acc.nan_b += int(nb.sum())
    acc.inf_a += int(ia.sum())
    acc.inf_b += int(ib.sum())
    acc.nan_agree &= bool(torch.equal(na, nb))
    both_inf_same = ia & ib & (a64 == b64)
    acc.inf_agree &= bool(torch.equal(ia, ib)) and bool(torch.equal(both_inf_same, ia))
    finite = ~(na | nb | ia | ib)
    ok_nonfinite = both_inf_same | (na & nb if tol.equal_nan else torch.zeros_like(na))
    bad_nonfinite = ~finite & ~ok_nonfinite
    diff = torch.where(finite, (a64 - b64).abs(), 0.0)
    absb = torch.where(finite, b64.abs(), 0.0)
    absa = torch.where(finite, a64.abs(), 0.0)
    if tol.exact:
        bad = _bits_differ(a, b)
    elif integer and tol.atol == 0 and tol.rtol == 0:
        bad = (a != b) | bad_nonfinite  # exact for int64 beyond 2**53
    else:
        bad = (diff > tol.atol + tol.rtol * absb) | bad_nonfinite
    n_bad = int(bad.sum())
    if n_bad and acc.first is None:
        acc.first = start + int(torch.argmax(bad.to(torch.uint8)))
    acc.n_bad += n_bad
    acc.nonfinite_bad |= bool(bad_nonfinite.any())
    if diff.numel():
        acc.max_abs = max(acc.max_abs, float(diff.max()))
        acc.sum_abs += float(diff.sum())
        acc.sum_absb += float(absb.sum())
        acc.max_absb = max(acc.max_absb, float(absb.max()))
        acc.n_finite += int(finite.sum())
        rel = torch.where(absb > 0, diff / torch.where(absb > 0, absb, 1.0),
                          torch.where(diff > 0, math.inf, 0.0))
        acc.max_rel = max(acc.max_rel, float(rel.max()))
        acc.req_atol = max(acc.req_atol, float((diff - tol.rtol * absb).max()))
        need = torch.where(absb > 0, (diff - tol.atol) / torch.where(absb > 0, absb, 1.0),
                           torch.where(diff > tol.atol, math.inf, 0.0))
        acc.req_rtol = max(acc.req_rtol, float(need.max()))
        fa, fb = torch.where(finite, a64, 0), torch.where(finite, b64, 0)
        if fa.is_complex():
            acc.dot += float((fa.conj() * fb).real.sum())
        else:
            acc.dot += float((fa * fb).sum())
        acc.norm_a += float((absa * absa).sum())
        acc.norm_b += float((absb * absb).sum())


def _finite_chunk(acc: _Acc, a64: torch.Tensor, b64: torch.Tensor, start: int, tol: ResolvedTolerance) -> None:
    """The common case, every element finite on both sides: the same numbers as :func:`_chunk`
    without the NaN/Inf bookkeeping (half the passes)."""
    import torch

    diff = (a64 - b64).abs_()
    absb = b64.abs()
    bad = diff > absb * tol.rtol + tol.atol
    n_bad = int(bad.sum())
    if n_bad and acc.first is None:
        acc.first = start + int(torch.argmax(bad.to(torch.uint8)))
    acc.n_bad += n_bad
    acc.n_finite += diff.numel()
    acc.max_abs = max(acc.max_abs, float(diff.max()))
    acc.sum_abs += float(diff.sum())
    acc.sum_absb += float(absb.sum())
    acc.max_absb = max(acc.max_absb, float(absb.max()))
    positive = absb > 0
    safe = torch.where(positive, absb, 1.0)
    acc.max_rel = max(acc.max_rel, float(torch.where(positive, diff / safe,
                                                     torch.where(diff > 0, math.inf, 0.0)).max()))
    acc.req_atol = max(acc.req_atol, float((diff - tol.rtol * absb).max()))
    acc.req_rtol = max(acc.req_rtol, float(torch.where(positive, (diff - tol.atol) / safe,
                                                       torch.where(diff > tol.atol, math.inf, 0.0)).max()))
    flat_a, flat_b = a64.reshape(-1), b64.reshape(-1)
    acc.dot += float(torch.dot(flat_a, flat_b))
    acc.norm_a += float(torch.dot(flat_a, flat_a))
    acc.norm_b += float(torch.dot(flat_b, flat_b))


_KERNEL_DTYPES = ("float32", "float64")


def _kernel_acc(a: torch.Tensor, b: torch.Tensor, tol: ResolvedTolerance) -> _Acc | None:
    """The statistics of two flat tensors from the C kernel, or ``None`` where it does not apply
    (no kernel, another dtype or device, exact mode) or either side holds a NaN or an Inf (the
    torch route counts those)."""
    if (_kernel is None or tol.exact or a.dtype != b.dtype or dtype_name(a.dtype) not in _KERNEL_DTYPES
            or a.device.type != "cpu" or b.device.type != "cpu"):
        return None
    try:
        left, right = a.detach().contiguous().numpy(), b.detach().contiguous().numpy()
    except (RuntimeError, TypeError):  # a view numpy cannot share (negated, conjugated)
        return None
    out = _kernel.compare(left, right, dtype_name(a.dtype) == "float64", float(tol.atol), float(tol.rtol))
    return None if out is None else _acc_of(out, a.numel())


def _acc_of(out: tuple, numel: int) -> _Acc:
    """The kernel's tuple as the running aggregates of the torch route."""
    n_bad, first, max_abs, sum_abs, sum_absb, max_absb, max_rel, req_atol, req_rtol, dot, norm_a, norm_b = out
    return _Acc(max_abs=max_abs, max_rel=max_rel, sum_abs=sum_abs, sum_absb=sum_absb, max_absb=max_absb,
                n_finite=numel, dot=dot, norm_a=norm_a, norm_b=norm_b, n_bad=n_bad,
                first=first if first >= 0 else None, req_atol=max(0.0, req_atol), req_rtol=max(0.0, req_rtol))


def _accumulate(flat_a: torch.Tensor, flat_b: torch.Tensor, tol: ResolvedTolerance, chunk: int,
                integer: bool) -> _Acc:
    """Every statistic of two flat tensors: from the C kernel where it applies, else chunk by chunk."""
    acc = _kernel_acc(flat_a, flat_b, tol)
    if acc is not None:
        return acc
    acc = _Acc()
    for start in range(0, flat_a.numel(), chunk):
        _chunk(acc, flat_a[start:start + chunk], flat_b[start:start + chunk], start, tol, integer)
    return acc


def _eps(*dtypes: torch.dtype | str) -> float:
    """The machine epsilon of the coarsest floating dtype among ``dtypes`` (0 for integers)."""
    return max((dtype_info(d).eps for d in dtypes), default=0.0)


def _scaled(tol: ResolvedTolerance, acc: _Acc, recount: Callable[[ResolvedTolerance], _Acc], integer: bool,
            dtype_a: torch.dtype | str, dtype_b: torch.dtype | str) -> tuple[ResolvedTolerance, _Acc]:
    """Apply ``tol.ulps``: atol at least that many ulps of the compared dtype at ``max|b|``.

    The scale is known only once every chunk was read, so elements were judged at the plain
    atol; where the raised atol covers every error the verdict is read off the required atol,
    else (a real mismatch) the elements are counted again at the raised atol.
    """
    if not tol.ulps or tol.exact or integer:
        return tol, acc
    atol = tol.ulps * _eps(dtype_a, dtype_b) * acc.max_absb
    if not atol > tol.atol:
        return tol, acc
    raised = replace(tol, atol=atol, source=f"{tol.source}, {tol.ulps:.3g} ulp of max|b|")
    if acc.n_bad == 0:
        return raised, acc
    if acc.req_atol <= atol and not acc.nonfinite_bad:
        return raised, replace(acc, n_bad=0, first=None)
    return raised, recount(raised)


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: do the two elements differ in any bit (so -0.0 vs 0.0 and NaN payloads count)?"""
    import torch

    if a.dtype != b.dtype:
        return a != b
    size = a.element_size()
    return (a.contiguous().view(torch.uint8).view(-1, size) != b.contiguous().view(torch.uint8).view(-1, size)).any(1)


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def _scalar(x: torch.Tensor) -> float | complex:
    value = x.item()
    return value if isinstance(value, (float, complex)) else float(value)


def compare_tensors(
    key: str,
    a: torch.Tensor | Gather,
    b: torch.Tensor,
    tolerance: Tolerance | ResolvedTolerance | None = None,
    *,
    key_b: str | None = None,
    chunk: int = CHUNK,
) -> TensorComparison:
    """Compare two tensors and return a :class:`TensorComparison`.

    Different dtypes are compared by value (in float64, or complex128) and reported; different
    shapes are reported, never broadcast. Identical bytes short-circuit. ``a`` may be a
    :class:`~tensorparity.numerics.gathered.Gather` (A reordered on one axis): the record is that
    of the gathered copy, which the C kernel does not need to make.

    Example:
        >>> import torch
        >>> r = compare_tensors("w", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        >>> r.status, r.max_abs, r.first_index
        ('mismatch', 0.5, (1,))
    """
    import torch

    if isinstance(a, Gather):
        found = _compare_gathered(key, a, b, tolerance, key_b)
        if found is not None:
            return found
        a = a.materialize()
    tol = _resolve(tolerance, key, a.dtype, b.dtype)
    common = dict(key=key, key_b=key_b, shape_a=tuple(a.shape), shape_b=tuple(b.shape),
                  dtype_a=dtype_name(a.dtype), dtype_b=dtype_name(b.dtype), tolerance=tol)
    if a.shape != b.shape:
        return TensorComparison(passed=False, status="shape", numel=a.numel(), **common)  # type: ignore[arg-type]
    numel = a.numel()
    a, b = a.detach(), b.detach()  # values, not a graph
    nan_unequal = not tol.equal_nan and (a.is_floating_point() or a.is_complex()) and bool(torch.isnan(a).any())
    if not nan_unequal and same_bytes(a, b):
        return TensorComparison(passed=True, status="identical", numel=numel, **common)  # type: ignore[arg-type]
    if b.device != a.device:
        b = b.to(a.device)
    if a.dtype == torch.bool:
        a = a.to(torch.uint8)
    if b.dtype == torch.bool:
        b = b.to(torch.uint8)
    integer = not (a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex())
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    acc = _accumulate(flat_a, flat_b, tol, chunk, integer)
    tol, acc = _scaled(tol, acc, lambda t: _accumulate(flat_a, flat_b, t, chunk, integer), integer, a.dtype, b.dtype)
    return _record(common, tol, acc, tuple(a.shape), numel, lambda i: _scalar(flat_a[i]), lambda i: _scalar(flat_b[i]))


def _resolve(tolerance: Tolerance | ResolvedTolerance | None, key: str, dtype_a: torch.dtype,
             dtype_b: torch.dtype) -> ResolvedTolerance:
    if isinstance(tolerance, ResolvedTolerance):
        return tolerance
    return (tolerance or Tolerance()).for_key(key, dtype_a, dtype_b)


def _record(common: dict, tol: ResolvedTolerance, acc: _Acc, shape: tuple[int, ...], numel: int,
            value_a: Callable[[int], float | complex], value_b: Callable[[int], float | complex]) -> TensorComparison:
    """The record of a measured pair: the verdict under ``tol.statistic`` and every statistic."""
    if tol.statistic == "max":
        within = acc.max_abs <= tol.atol + tol.rtol * acc.max_absb
    elif tol.statistic == "mean":
        n = max(1, acc.n_finite)
        within = acc.sum_abs / n <= tol.atol + tol.rtol * acc.sum_absb / n
    else:
        within = acc.n_bad == 0
    passed = within and not acc.nonfinite_bad and not tol.exact
    denom = math.sqrt(acc.norm_a) * math.sqrt(acc.norm_b)
    cosine = acc.dot / denom if denom > 0 else (1.0 if acc.norm_a == acc.norm_b == 0 else 0.0)
    first = _unravel(acc.first, shape) if acc.first is not None else None
    return TensorComparison(
        passed=passed,
        status="close" if passed else "mismatch",
        numel=numel,
        max_abs=acc.max_abs,
        max_rel=acc.max_rel,
        mean_abs=acc.sum_abs / max(1, acc.n_finite),
        cosine=cosine,
        n_mismatch=acc.n_bad,
        frac_mismatch=acc.n_bad / max(1, numel),
        nan_a=acc.nan_a, nan_b=acc.nan_b, inf_a=acc.inf_a, inf_b=acc.inf_b,
        nan_agree=acc.nan_agree, inf_agree=acc.inf_agree,
        first_index=first,
        first_a=value_a(acc.first) if acc.first is not None else None,
        first_b=value_b(acc.first) if acc.first is not None else None,
        required_atol=max(0.0, acc.req_atol),
        required_rtol=max(0.0, acc.req_rtol),
        **common,  # type: ignore[arg-type]
    )


def _compare_gathered(key: str, g: Gather, b: torch.Tensor, tolerance: Tolerance | ResolvedTolerance | None,
                      key_b: str | None) -> TensorComparison | None:
    """``compare_tensors(key, g.materialize(), b)`` read in place by the C kernel, without the copy;
    ``None`` where the kernel does not apply (then the copy is compared): the same record either
    way, as the kernel reads the gathered elements in the copy's order."""
    import torch

    src = g.tensor
    if (_kernel is None or src.dtype != b.dtype or dtype_name(src.dtype) not in _KERNEL_DTYPES or src.device.type != "cpu"
            or b.device.type != "cpu" or g.index.device.type != "cpu" or src.dim() == 0 or g.index.dim() != 1
            or g.shape != tuple(b.shape)):
        return None
    tol = _resolve(tolerance, key, src.dtype, b.dtype)
    if tol.exact:
        return None
    try:
        left, right = src.detach().contiguous().numpy(), b.detach().contiguous().numpy()
    except (RuntimeError, TypeError):  # a view numpy cannot share (negated, conjugated)
        return None
    index = g.index.to(torch.int64).contiguous().numpy()
    outer, size, inner = g.layout()
    if index.size and not (int(index.min()) >= 0 and int(index.max()) < size):
        return None  # the copy raises what it raises
    numel = math.prod(g.shape)

    def measure(t: ResolvedTolerance) -> tuple[tuple | None, bool]:
        return _kernel.compare_gathered(left, right, index, src.dtype == torch.float64, float(t.atol), float(t.rtol),
                                        outer, size, inner)

    out, same = measure(tol)
    if out is None:  # a NaN or an Inf: the torch route counts them, on the copy
        return None
    common = {"key": key, "key_b": key_b, "shape_a": g.shape, "shape_b": tuple(b.shape),
              "dtype_a": dtype_name(src.dtype), "dtype_b": dtype_name(b.dtype), "tolerance": tol}
    if same:  # what same_bytes says of the copy
        return TensorComparison(passed=True, status="identical", numel=numel, **common)  # type: ignore[arg-type]
    acc = _acc_of(out, numel)
    tol, acc = _scaled(tol, acc, lambda t: _acc_of(measure(t)[0], numel), False, src.dtype, b.dtype)
    flat_b = b.detach().reshape(-1)
    return _record(common, tol, acc, g.shape, numel, g.value, lambda i: _scalar(flat_b[i]))


def buffers_comparable(dtype: str) -> bool:
    """Whether :func:`compare_buffers` can compare raw bytes of this dtype (float32, float64)."""
    return _kernel is not None and dtype_name(dtype) in _KERNEL_DTYPES


def first_outside(a: Any, b: Any, dtype: str, tolerance: ResolvedTolerance, limit: int = -1, *,
                  scaled: bool = True) -> bool | None:
    """Whether two buffers of one float32/float64 dtype hold an element (among the first
    ``limit``; all where ``limit < 0``) outside ``tolerance`` with both its values finite: the
    elementwise verdict of :func:`compare_buffers` (``True``: it fails), found without measuring.
    ``tolerance.ulps`` raises atol as :func:`compare_buffers` does, from ``max|b|`` over all of B
    (``scaled=False``: not raised, a guess from the first elements that reads no more of B).

    ``None`` where that cannot be said: no kernel, another dtype, misaligned or unequal buffers,
    ``max|b|`` not finite, or the first element outside holds a NaN or an Inf (whose verdict
    depends on ``equal_nan``).
    """
    name = dtype_name(dtype)
    if not buffers_comparable(name):
        return None
    assert _kernel is not None
    double = name == "float64"
    scale = tolerance.ulps * _eps(name) if scaled and tolerance.ulps and not tolerance.exact else 0.0
    try:
        found = _kernel.first_outside(a, b, double, float(tolerance.atol), float(tolerance.rtol), limit, scale)
    except ValueError:
        return None
    if found == -1:
        return False
    if found < 0:
        return None
    code, size = ("<d", 8) if double else ("<f", 4)
    x, y = struct.unpack_from(code, a, found * size)[0], struct.unpack_from(code, b, found * size)[0]
    return True if math.isfinite(x) and math.isfinite(y) else None


def compare_buffers(
    key: str,
    a: Any,
    b: Any,
    *,
    shape: tuple[int, ...],
    dtype: str,
    tolerance: ResolvedTolerance,
    key_b: str | None = None,
) -> TensorComparison | None:
    """Compare two buffers of one dtype and shape (raw file bytes, C order) without torch.

    The C kernel's route of :func:`compare_tensors`, for float32 and float64 data whose elements
    are all finite: the same statistics and the same record. Returns ``None`` wherever that route
    does not apply (no kernel, another dtype, exact mode, a NaN or an Inf, misaligned bytes): the
    caller then compares the tensors.
    """
    name = dtype_name(dtype)
    if tolerance.exact or not buffers_comparable(name):
        return None
    double = name == "float64"
    numel = math.prod(shape)

    def measure(t: ResolvedTolerance) -> tuple[Any, ...] | None:
        assert _kernel is not None
        return _kernel.compare(a, b, double, float(t.atol), float(t.rtol))  # type: ignore[no-any-return]

    try:
        out = measure(tolerance)
    except ValueError:  # lengths differ or the bytes are not aligned for the dtype
        return None
    if out is None:
        return None
    tol, acc = _scaled(tolerance, _acc_of(out, numel), lambda t: _acc_of(measure(t), numel), False, name, name)
    code, size = ("<d", 8) if double else ("<f", 4)
    common = dict(key=key, key_b=key_b, shape_a=tuple(shape), shape_b=tuple(shape), dtype_a=name, dtype_b=name,
                  tolerance=tolerance)
    return _record(common, tol, acc, tuple(shape), numel, lambda i: struct.unpack_from(code, a, i * size)[0],
                   lambda i: struct.unpack_from(code, b, i * size)[0])
