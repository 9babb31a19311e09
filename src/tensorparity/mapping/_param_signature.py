"""Parameter signatures: :func:`param_signature`, :class:`ParamSignature`.

A trace captured in ``stats`` mode keeps no parameter tensors, only a :class:`ParamSignature` of
each; :func:`~tensorparity.mapping._digests.suggest_from_signatures` finds from those the same
mapping that :func:`~tensorparity.mapping.suggest_mapping` finds from the tensors.

The signature. The tensor is seen as a matrix ``[R, C]``: dims of size 1 dropped, then the first
dim by the product of the others (a vector is ``[n, 1]``, a scalar ``[1, 1]``). Each element is
read as its bit pattern in 32-bit words (narrower elements widened, wider ones split). The digest
of a sequence of elements (a row, a column) is two wrapping sums modulo 2**32 of its words times
fixed weights of their positions, packed in one int64. The signature keeps the digest of every row
and of every column, in order: ``R + C`` int64 (8 (R + C) bytes), and shape and dtype. Rows and
columns use one function of "a sequence", so a column of A is a row of B exactly when A's column
is B's row, and:

- identical tensors have equal rows (reshaped ones through dims of size 1 too; a constant tensor
  in any shape);
- a transposed 2-D weight has its rows in the other's columns;
- a RoPE row permutation permutes the rows; a concatenation along dim 0 concatenates them, along
  dim 1 the columns (a ``Conv1D`` ``c_attn`` split into transposed ``Linear`` s: A's columns are
  the parts' rows); a vector's rows are its elements.

Digests are exact integer sums (an integer matrix product on the CPU), the same on every device
and in every order of summation. Like the trace's fingerprints they are not cryptographic hashes:
unrelated rows collide with odds of about 2**-63. Sums modulo 2**32 see a word's top bit only
through the parity of its weights, so lane 1 weighs position 0 odd and every other position even:
a change shared by every element (a negation flips every sign bit; normal numbers scaled by 2**k)
always shows, and so does a sign flip of an odd number of elements or of the first; flipping the
signs of an even number of elements other than the first does not. Signatures cannot show at all a
reshape across dims that are not 1 (``[H*D, C]`` vs ``[H, D, C]``), a permutation or a
concatenation along a later dim of a 3-d/4-d tensor, a cast (other bytes). Optional float64
statistics (``stats``) pair what is left when close, with low confidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensorparity.errors import CorruptCheckpointError, UsageError
from tensorparity.mapping._signatures import tensor_stats
from tensorparity.mapping.transforms import parse_dtype

try:  # the optional C accelerator (setup.py): the same digests in one read of the words
    from tensorparity.checkpoint.tracefolder import _fused
except ImportError:  # pragma: no cover - no C compiler where it was installed
    _fused = None

__all__ = ["SCHEMA", "ParamSignature", "param_signature"]

SCHEMA = "tensorparity.signature/1"
_MASK = (1 << 32) - 1
_CACHE = 1 << 22  # positions of weights kept per device
_CHUNK = 1 << 24  # int64 elements per product off the CPU
_weights_cache: dict[str, torch.Tensor] = {}


# --- the signature ---------------------------------------------------------------------------------

def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    dims = [s for s in shape if s != 1]
    return (dims[0], math.prod(dims[1:])) if dims else (1, 1)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _weights(n: int, device: torch.device) -> torch.Tensor:
    """Position weights ``[2, n]``: int32 on the CPU (for its integer matrix products), int64
    elsewhere. Lane 0: odd; lane 1: odd at position 0, even elsewhere. Position ``j`` weighs the
    same whatever the length, so a slice's digest is a part's digest."""
    key = "cpu" if device.type == "cpu" else str(device)
    have = _weights_cache.get(key)
    if have is None or have.shape[1] < n:
        j = np.arange(max(n, 4096, 2 * (have.shape[1] if have is not None else 0)), dtype=np.uint64)
        lanes = _splitmix(np.stack([2 * j, 2 * j + np.uint64(1)])) >> np.uint64(32)
        lanes[0] |= np.uint64(1)
        lanes[1] &= ~np.uint64(1)
        lanes[1, 0] |= np.uint64(1)
        made = torch.from_numpy(lanes.astype(np.uint32).view(np.int32).copy())
        made = made if device.type == "cpu" else made.to(device=device, dtype=torch.int64)
        if made.shape[1] > _CACHE:
            return made[:, :n]
        have = _weights_cache[key] = made
    return have[:, :n]


def _sums(w: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """``w @ x`` modulo 2**32 (``w``: [2, n] weights, ``x``: [n, m] int32 words), as uint64 [2, m]."""
    if x.device.type == "cpu":  # an int32 matrix product wraps modulo 2**32 and is fast
        return (w @ x).numpy().view(np.uint32).astype(np.uint64)
    return _sums_by_parts(w, x)


def _sums_by_parts(w: torch.Tensor, x: torch.Tensor, chunk: int = _CHUNK) -> np.ndarray:
    """:func:`_sums` where there is no integer matrix product (accelerators): products in int64,
    each cut to 32 bits before it is summed, so that no sum ever overflows; in chunks of ``chunk``."""
    n, m = x.shape
    out = torch.zeros(2, m, dtype=torch.int64, device=x.device)
    rows = max(1, min(n, chunk // 2))
    cols = max(1, chunk // (2 * rows))
    for r in range(0, n, rows):
        for c in range(0, m, cols):
            part = x[r:r + rows, c:c + cols].to(torch.int64)
            out[:, c:c + cols] += ((w[:, r:r + rows, None] * part[None]) & _MASK).sum(1)
            out[:, c:c + cols] &= _MASK
    return out.cpu().numpy().astype(np.uint64)


def _pack(lanes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((lanes[0] | (lanes[1] << np.uint64(32))).view(np.int64).copy())


def _per_element(dtype: torch.dtype) -> int:
    """Words per element: wide elements are split into 32-bit words, narrow ones widened to one
    (a complex number's parts each)."""
    part = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    return (2 if dtype.is_complex else 1) * max(1, part // 4)


def _words(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The elements as int32 words, ``[R, C * k]`` (``k`` words per element)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.element_size() >= 4:
        words = flat.view(torch.int32)
    else:
        words = flat.view(torch.int16 if flat.element_size() == 2 else torch.uint8).to(torch.int32)
    rows, cols = _matrix(tuple(t.shape))
    k = _per_element(t.dtype)
    return words.view(rows, cols * k), k


@dataclass(frozen=True, eq=False)
class ParamSignature:
    """The content signature of one parameter: digests of its rows and columns, shape, dtype.

    Attributes:
        shape, dtype: the parameter's.
        rows, cols: int64 digests (CPU) of the rows and columns of the tensor seen as a matrix
            ``[R, C]`` (dims of size 1 dropped, then the first dim by the others).
        stats: optional float64 ``(mean, std, min, max, rms)``, for a low-confidence pairing of
            tensors that are close but not equal.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: torch.Tensor
    cols: torch.Tensor
    stats: tuple[float, float, float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        for name in ("rows", "cols"):  # digests are small; matching reads them on the CPU
            if isinstance(getattr(self, name), torch.Tensor):
                object.__setattr__(self, name, getattr(self, name).detach().cpu())
        r, c = self.matrix
        for name, t, n in (("rows", self.rows, r), ("cols", self.cols, c)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise UsageError(f"a signature of shape {list(self.shape)} needs {name} as int64 [{n}], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}",
                                 fix="make signatures with param_signature(tensor)")

    @property
    def matrix(self) -> tuple[int, int]:
        """``(R, C)``: the shape the rows and columns are of."""
        return _matrix(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamSignature):
            return NotImplemented
        return (self.shape, self.dtype, self.stats) == (other.shape, other.dtype, other.stats) and bool(
            torch.equal(self.rows, other.rows) and torch.equal(self.cols, other.cols))

    __hash__ = None  # type: ignore[assignment]

    def to_tensors(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(digests, record)``: one int64 tensor ``[R + C]`` (rows, then columns) for a
        safetensors shard, and a JSON-ready record (schema, shape, dtype, stats) to keep beside it.

        Example:
            >>> sig = param_signature(torch.ones(3, 2))
            >>> digests, record = sig.to_tensors()
            >>> digests.shape, record["shape"], ParamSignature.from_tensors(digests, record) == sig
            (torch.Size([5]), [3, 2], True)
        """
        stats = None if self.stats is None else [v if math.isfinite(v) else str(v) for v in self.stats]
        record = {"schema": SCHEMA, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                  "stats": stats}
        return torch.cat([self.rows, self.cols]), record

    @classmethod
    def from_tensors(cls, digests: torch.Tensor, record: MappingABC[str, Any]) -> ParamSignature:
        """The signature :meth:`to_tensors` wrote.

        Raises:
            CorruptCheckpointError: the record is of another schema, or does not fit the digests.
        """
        fix = "capture the trace again with this version of tensorparity"
        if record.get("schema") != SCHEMA:
            raise CorruptCheckpointError(f"a parameter signature of schema {record.get('schema')!r}, not {SCHEMA!r}",
                                         fix=fix)
        try:
            shape = tuple(int(s) for s in record["shape"])
            dtype = parse_dtype(record["dtype"])
            stats = record.get("stats")
            stats = None if stats is None else tuple(float(v) for v in stats)
            r, c = _matrix(shape)
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise CorruptCheckpointError(f"a parameter signature record is malformed: {exc}", fix=fix) from None
        if digests.dtype != torch.int64 or tuple(digests.shape) != (r + c,) or (stats is not None and len(stats) != 5):
            raise CorruptCheckpointError(f"a signature of shape {list(shape)} needs int64 [{r + c}] digests and 5 "
                                         f"statistics, got {digests.dtype} {list(digests.shape)}", fix=fix)
        digests = digests.detach().cpu()
        return cls(shape, dtype, digests[:r].clone(), digests[r:].clone(), stats)  # type: ignore[arg-type]


def param_signature(t: torch.Tensor, *, stats: bool = False) -> ParamSignature:
    """The content signature of a parameter, computed on its device (two integer matrix products
    on the CPU: a float32 4096 x 4096 weight in a few tens of milliseconds).

    Args:
        t: the tensor (any dtype, any device but meta).
        stats: also keep float64 ``(mean, std, min, max, rms)`` (a few more passes).

    Raises:
        UsageError: ``t`` is not a tensor, or has no data (a meta tensor).

    Example:
        >>> w = torch.arange(6.0).view(2, 3)
        >>> torch.equal(param_signature(w).rows, param_signature(w.T.contiguous()).cols)
        True
    """
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        what = "a meta tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise UsageError(f"a signature needs a tensor with data, got {what}", fix="sign the materialised parameter")
    shape = tuple(t.shape)
    words, k = _words(t)
    r, width = words.shape
    w = _weights(max(width, k * r), words.device)
    if _fused is not None and words.device.type == "cpu" and words.numel():  # both products in one read, in C
        packed_rows, packed_cols = torch.empty(r, dtype=torch.int64), torch.empty(width // k, dtype=torch.int64)
        _fused.signature(words.numpy(), r, width, k, w[0].numpy(), w[1].numpy(), packed_rows.numpy(),
                         packed_cols.numpy())
    else:
        rows = _sums(w[:, :width], words.T)
        grid = words.view(r, width // k, k)
        cols = sum((_sums(w[:, q::k][:, :r], grid[:, :, q]) for q in range(k)), np.zeros((2, width // k), np.uint64))
        packed_rows, packed_cols = _pack(rows), _pack(cols & np.uint64(_MASK))
    summary = None
    if stats:
        try:
            summary = tensor_stats(t)
        except (RuntimeError, TypeError, ValueError):  # complex, or a dtype float64 cannot take
            summary = None
    return ParamSignature(shape, t.dtype, packed_rows, packed_cols, summary)


# --- keys: what equal content looks like in signatures -----------------------------------------------
