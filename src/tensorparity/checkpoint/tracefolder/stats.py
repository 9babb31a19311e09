"""The statistics a trace keeps of every tensor, and its content fingerprint.

Both are computed where the tensor lives, in as few operations as possible: a capture in
``stats`` mode measures hundreds of tensors per step, each right after a large kernel has flushed
the caches, where every tensor operation costs ten microseconds or more whatever its size. A
large tensor takes five reductions of its data (row and column sums of its bit patterns for the
fingerprint, min/max, the sum, a BLAS dot for the norm) and a dozen operations in all; a small
one on the CPU (up to 256 KB: norm weights, biases) is measured by NumPy, whose fixed cost per
operation is a fifth of torch's. Where the optional C accelerator is built (``_fused.c``), a
float32/float64 CPU tensor is instead read once for all of it. Every route computes the same
fingerprint, bit for bit.

The sums run in float32 for 16/32-bit floats (a float64 accumulator costs a widening pass). A
tensor whose float32 sum of squares could overflow (an attention mask filled with
``finfo(float32).min``, a diverged gradient of 1e19), which its min and max alone tell, has its
moments computed in float64 instead: two-pass, and scaled by a power of two where float64 itself
could overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

try:  # the optional C accelerator (setup.py); without it the torch route computes the same
    from tensorparity.checkpoint.tracefolder import _fused
except ImportError:  # built without a C compiler
    _fused = None

__all__ = ["TensorStats", "fingerprint", "same_content", "tensor_bytes", "tensor_stats"]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's elements as bytes, in C order, on the CPU: what every digest of a tensor's content
    reads (a resume fingerprint, a mapping's content digest). A complex tensor gives its real and
    imaginary parts interleaved, as it stores them.

    Example:
        >>> bytes(tensor_bytes(torch.tensor([1, 2], dtype=torch.int16)))
        b'\\x01\\x00\\x02\\x00'
    """
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor, computed where the tensor lives (on its device)."""

    numel: int
    min: float
    max: float
    mean: float
    std: float
    norm: float
    nan: int
    inf: int
    hash: str  # content fingerprint (see fingerprint()), "" when not computed

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, float) and (v != v or abs(v) == float("inf")) else v)
                for k, v in ((k, getattr(self, k)) for k in _STATS_FIELDS)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorStats:
        # Fields a newer minor schema version adds are ignored; the known ones are required. The
        # fields are set as the frozen dataclass's __init__ would set them, without its nine
        # object.__setattr__ calls: a manifest holds thousands of these (half of reading one).
        out = object.__new__(cls)
        out.__dict__.update({k: (float(data[k]) if k in _FLOATS else data[k]) for k in _STATS_FIELDS})
        return out


_STATS_FIELDS = tuple(f.name for f in fields(TensorStats))  # a manifest holds thousands of these
_FLOATS = frozenset(("min", "max", "mean", "std", "norm"))
_BLOCK = 1024  # words per row of the fingerprint's grid
_SMALL_BYTES = 256 * 1024  # CPU tensors up to this size are measured by NumPy
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CACHE_LIMIT = 1 << 24  # int64 elements of weights kept per cache (128 MB at most)
_POSITIONS: dict[tuple[int, str], torch.Tensor] = {}
_WEIGHTS: dict[tuple[int, int, str], Any] = {}


def _positions(n: int, device: torch.device | str) -> torch.Tensor:
    key = (n, str(device))
    weights = _POSITIONS.get(key)
    if weights is None:
        # Odd multipliers of a Weyl sequence: every position weighs differently, so a permuted or
        # transposed tensor changes the fingerprint even though its sum does not.
        weights = torch.arange(n, device=device, dtype=torch.int64) * 0x9E3779B97F4A7C15 % (1 << 62) * 2 + 1
        _remember(_POSITIONS, key, weights, n)
    return weights


def _remember(cache: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    if size > _CACHE_LIMIT:
        return
    if sum(v.size if isinstance(v, np.ndarray) else v.numel() for v in cache.values()) + size > _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _weights(rows: int, tail: int, device: torch.device | str, numpy: bool) -> Any:
    """The fingerprint as one matrix product: the words are laid out as ``rows`` row sums, 1024
    column sums (when ``rows``) and ``tail`` left-over words; row 0 of the matrix sums the row
    sums, row 1 the tail, row 2 weighs everything by position (rows x1, columns x31, tail x17)."""
    key = (rows, tail, "numpy" if numpy else str(device))
    matrix = _WEIGHTS.get(key)
    if matrix is None:
        cols = _BLOCK if rows else 0
        matrix = torch.zeros(3, rows + cols + tail, dtype=torch.int64, device=device)
        matrix[0, :rows] = 1
        matrix[1, rows + cols:] = 1
        if rows:
            matrix[2, :rows] = _positions(rows, device)
            matrix[2, rows:rows + cols] = 31 * _positions(cols, device)
        if tail:
            matrix[2, rows + cols:] = 17 * _positions(tail, device)
        if numpy:
            matrix = matrix.numpy()
        _remember(_WEIGHTS, key, matrix, 3 * (rows + cols + tail))
    return matrix


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' bytes as the widest integer type that divides them (int64 for most tensors).
    The width depends on the byte count only, never on where the tensor starts in its storage."""
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and flat.element_size() <= 8:
        try:  # one view for the common case
            return flat.view(torch.int64)
        except RuntimeError:  # misaligned start, or a dtype view cannot reinterpret: the long way
            pass
    raw = flat.view(torch.uint8)
    width = next((w for w in (8, 4, 2) if raw.numel() % w == 0), 1)
    if width == 1:
        return raw
    try:
        return raw.view(_INT_VIEW[width])
    except RuntimeError:  # a view starting at a misaligned offset: an aligned copy
        return raw.clone().view(_INT_VIEW[width])


def fingerprint(t: torch.Tensor) -> str:
    """A content fingerprint computed where the tensor lives (no copy to the CPU): wrapping sums of
    the elements' bit patterns, read as 64-bit integers (narrower where the byte count demands) —
    all of them, and position-weighted sums of the rows and columns of the words laid out in
    blocks of 1024.

    Equal tensors always agree (integer sums wrap the same way on every device and in every
    order); different ones disagree unless their bit patterns collide in every sum, which
    accidental differences (a changed element, a swapped pair, a transposed or permuted weight) do
    not. It is a fingerprint for "these are the same numbers", not a cryptographic hash. The sums
    run in the words' own integer type (a widening sum is ten times slower on CPUs), so it costs
    about two passes at memory speed. ``fp2:`` fingerprints are only ever compared with ``fp2:``.

    Example:
        >>> a = torch.arange(6.0).reshape(2, 3)
        >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(a.t().contiguous())
        (True, False)
    """
    return _fingerprint(_flat(t))


def _flat(t: torch.Tensor) -> torch.Tensor:
    # One dense row-major copy of a strided or expanded tensor (none of a contiguous one).
    flat = (t.detach() if t.requires_grad else t).reshape(-1)
    return flat if flat.is_contiguous() else flat.contiguous()


def _fingerprint(flat: torch.Tensor) -> str:
    if flat.numel() == 0:
        return "fp2:" + "0" * 32
    bits = _bits(flat)
    if bits.element_size() < 4:  # rare (odd byte counts): widen, these sums wrap too narrowly
        bits = bits.to(torch.int32)
    numpy = _small_cpu(bits)
    return _fingerprint_words(bits.numpy() if numpy else bits, bits.device, numpy, bits.element_size() == 8)


def _fingerprint_words(bits: Any, device: torch.device, numpy: bool, wide: bool) -> str:
    # bits: flat int32/int64 words, a torch tensor or (small, on the CPU) a NumPy array.
    n = len(bits)
    whole = n - n % _BLOCK
    parts = []
    if whole:
        grid = (bits if whole == n else bits[:whole]).reshape(-1, _BLOCK)
        parts += [grid.sum(1, dtype=bits.dtype), _column_sums(grid)]
    if whole < n:
        parts.append(bits[whole:])
    if not numpy and device.type == "cpu":  # the few sums left are combined by NumPy (less fixed cost)
        parts, numpy = [p.numpy() for p in parts], True
    return _combine(parts, whole // _BLOCK, n - whole, device, numpy, wide)


def _combine(parts: list[Any], rows: int, tail: int, device: torch.device, numpy: bool, wide: bool) -> str:
    # parts: [row sums, column sums] when rows, then the tail's words; NumPy arrays or tensors.
    matrix = _weights(rows, tail, device, numpy)
    if numpy:
        words = parts[0].astype(np.int64) if len(parts) == 1 else np.concatenate(parts, dtype=np.int64)
        row_total, tail_total, weighted = (matrix @ words).tolist()
    else:
        words = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int64)
        # An integer matrix-vector product on the CPU; CUDA has none, multiply and sum there.
        sums = matrix @ words if words.device.type == "cpu" else (matrix * words).sum(1)
        row_total, tail_total, weighted = sums.tolist()
    if not wide:  # int32 words: their row sums wrap at 32 bits
        row_total = (row_total + 2**31) % 2**32 - 2**31
    plain = row_total + tail_total
    return f"fp2:{plain & (2**64 - 1):016x}{weighted & (2**64 - 1):016x}"


def _column_sums(grid: Any) -> Any:
    """The column sums of a (rows, 1024) grid of words. On the CPU, torch sums a tall grid along its
    columns at a third of the speed of its rows; summing blocks of 8 or 16 rows first (a reduction
    over the middle of a (rows/q, q, 1024) view, at row speed) and then the few partial rows gives
    the same wrapping sums, bit for bit, in about two thirds of the time."""
    rows = len(grid)
    if isinstance(grid, torch.Tensor) and grid.device.type == "cpu":
        q = next((k for k in (16, 8) if rows >= 8 * k and rows % k == 0), 0)
        if q:
            return grid.view(rows // q, q, _BLOCK).sum(1, dtype=grid.dtype).sum(0, dtype=grid.dtype)
    return grid.sum(0, dtype=grid.dtype)


def _small_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() * t.element_size() <= _SMALL_BYTES


def same_content(a: str, b: str) -> bool | None:
    """Whether two fingerprints say "equal content"; ``None`` when they cannot tell (one missing,
    or made by different fingerprint versions)."""
    if not a or not b or a.split(":", 1)[0] != b.split(":", 1)[0]:
        return None
    return a == b


def tensor_stats(t: torch.Tensor, *, with_hash: bool = True, into: Any = None) -> TensorStats:
    """Statistics of ``t`` over its finite elements (NaN/Inf are counted, not averaged), computed
    where the tensor lives (float32 arithmetic for 16/32-bit floats, float64 for 64-bit and
    integer types, and for any tensor whose float32 sums could overflow, such as an attention mask
    of ``finfo(float32).min``).

    ``into``: a writable uint8 array as long as ``t``'s bytes (a CPU tensor's), or a list of them
    as long together, filled with them on the way: a trace writer's blocks, copied in the same
    read as the statistics where the C accelerator applies.

    Example:
        >>> s = tensor_stats(torch.tensor([1.0, 3.0, float("nan")]))
        >>> (s.min, s.max, s.mean, s.nan)
        (1.0, 3.0, 2.0, 1)
        >>> mask = tensor_stats(torch.full((4,), torch.finfo(torch.float32).min))
        >>> mask.norm == -2 * mask.mean, mask.std
        (True, 0.0)
    """
    flat = _flat(t)  # a strided tensor is copied once, for the fingerprint and the stats
    numel = flat.numel()
    if with_hash and _fused is not None and flat.dtype in (torch.float32, torch.float64) and flat.device.type == "cpu":
        done, copied = _fused_stats(flat, into)
        if copied:
            into = None
        if done is not None:
            return done
    if into is not None and numel:
        raw, at = flat.reshape(-1).view(torch.uint8).numpy(), 0
        for part in into if isinstance(into, list) else [into]:
            np.copyto(part, raw[at:at + len(part)])
            at += len(part)
    digest = _fingerprint(flat) if with_hash else ""
    if numel == 0:
        return TensorStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, digest)
    if flat.is_complex():
        x = flat.abs().to(torch.float64)
    elif flat.dtype in (torch.float32, torch.float64):
        x = flat
    elif flat.is_floating_point():
        x = flat.to(torch.float32)
    else:
        x = flat.to(torch.float64)
    if _small_cpu(x):
        x = x.numpy()
    low, high, total, squares = _passes(x)
    nan = inf = 0
    if not (math.isfinite(low) and math.isfinite(high)):
        # NaN propagates into min/max, Inf shows in min or max: only then look closer.
        xp: Any = np if isinstance(x, np.ndarray) else torch
        nan = int(xp.isnan(x).sum())
        inf = int(xp.isinf(x).sum())
        x = x[xp.isfinite(x)]
        if len(x) == 0:
            return TensorStats(numel, math.nan, math.nan, math.nan, math.nan, math.nan, nan, inf, digest)
        low, high, total, squares = _passes(x)
    if _may_overflow(low, high, len(x), x.dtype) or not (math.isfinite(total) and math.isfinite(squares)):
        return TensorStats(numel, low, high, *_wide_moments(x, low, high), nan, inf, digest)
    return _finish(numel, len(x), low, high, total, squares, nan, inf, digest)


def _finish(numel: int, n: int, low: float, high: float, total: float, squares: float, nan: int, inf: int,
            digest: str) -> TensorStats:
    # n: the finite elements the sums ran over.
    squares = max(0.0, squares)
    mean = total / n
    var = max(0.0, squares / n - mean * mean)
    return TensorStats(numel, low, high, mean, math.sqrt(var), math.sqrt(squares), nan, inf, digest)


def _fused_stats(flat: torch.Tensor, into: Any = None) -> tuple[TensorStats | None, bool]:
    """Fingerprint and statistics of a flat float32/float64 CPU tensor in one read (the C
    accelerator), and whether ``into`` was filled on the way; ``None`` where it does not apply (a
    misaligned view, an odd byte count) or the data holds NaN or Inf, which the exact route counts."""
    numel = flat.numel()
    nbytes = numel * flat.element_size()
    if numel == 0 or nbytes % 8 or flat.data_ptr() % 8:
        return None, False
    data = flat.numpy()
    extra = () if into is None else (into,)
    low, high, total, squares, plain, weighted = _fused.measure(data, flat.dtype == torch.float64, *extra)
    copied = into is not None
    # The C min/max skip NaN (the sums do not); Inf shows in min or max.
    wide = _may_overflow(low, high, numel, flat.dtype)
    if wide and (not (math.isfinite(low) and math.isfinite(high)) or np.isnan(data).any()):
        return None, copied
    if not wide and not (math.isfinite(total) and math.isfinite(squares)):
        return None, copied
    digest = f"fp2:{plain:016x}{weighted:016x}"  # as _combine makes it, in the same read
    if wide:
        return TensorStats(numel, low, high, *_wide_moments(data, low, high), 0, 0, digest), copied
    return _finish(numel, numel, low, high, total, squares, 0, 0, digest), copied


def _passes(x: Any) -> list[float]:
    """min, max, sum, sum of squares of a flat float32/float64 tensor or array. Sums are pairwise
    (torch cascades, NumPy pairs): a few ulps of the result, where a float64 accumulator would cost
    a widening pass; the squares come from a BLAS dot, twice vector_norm's speed."""
    if isinstance(x, np.ndarray):
        low, high = float(x.min()), float(x.max())
        if not (math.isfinite(low) and math.isfinite(high)) or _may_overflow(low, high, x.size, x.dtype):
            # NumPy warns on an overflowing float32 sum: leave those sums to the caller's exact route.
            return [low, high, math.nan, math.nan]
        return [low, high, float(x.sum()), float(np.dot(x, x))]
    low, high = torch.aminmax(x)
    if x.device.type == "cpu":  # no device to wait for: four reads beat a stack
        return [low.item(), high.item(), x.sum().item(), torch.dot(x, x).item()]
    return torch.stack([low, high, x.sum(), torch.dot(x, x)]).tolist()  # one synchronisation


# A sum of squares at most 2**120 (float32) or 2**1000 (float64) leaves a margin of 2**8 and more
# below the largest float for the rounding of the partial sums: it cannot overflow.
_SAFE_SQUARES = {4: 2.0**120, 8: 2.0**1000}


def _may_overflow(low: float, high: float, n: int, dtype: Any) -> bool:
    """Whether the float sums of ``n`` finite elements in [low, high] of ``dtype`` (torch or NumPy,
    float32 or float64) could overflow; ``False`` where either bound is NaN or infinite."""
    peak = max(abs(low), abs(high))
    return math.isfinite(peak) and peak * peak * n > _SAFE_SQUARES[dtype.itemsize]


def _wide_moments(x: Any, low: float, high: float) -> tuple[float, float, float]:
    """mean, std and norm of finite elements in [low, high], computed in float64: the sum, the sum
    of squares, and the variance from the deviations (two passes, so a constant mask gets std 0).
    Where float64 squares could overflow too (float64 data beyond 1e150), the elements are first
    scaled by a power of two, which is exact."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        x = x.numpy()  # one implementation for every CPU route: the C accelerator's results agree bit for bit
    n = len(x)
    peak = max(abs(low), abs(high))
    shift = math.frexp(peak)[1] if peak * peak * n > _SAFE_SQUARES[8] else 0
    if isinstance(x, np.ndarray):
        w = x.astype(np.float64)  # always a copy: the deviations are formed in place
        if shift:
            w *= 2.0**-shift
        total, squares = float(w.sum()), float(np.dot(w, w))
        w -= total / n
        deviations = float(np.dot(w, w))
    else:
        w = x.to(torch.float64, copy=True)
        if shift:
            w *= 2.0**-shift
        total_t, squares_t = w.sum(), torch.dot(w, w)
        w -= total_t / n
        total, squares, deviations = torch.stack([total_t, squares_t, torch.dot(w, w)]).tolist()  # one synchronisation
    return (_unscale(total / n, shift), _unscale(math.sqrt(deviations / n), shift),
            _unscale(math.sqrt(squares), shift))


def _unscale(value: float, shift: int) -> float:
    try:
        return math.ldexp(value, shift)
    except OverflowError:  # a float64 norm beyond the largest float64
        return math.copysign(math.inf, value)
