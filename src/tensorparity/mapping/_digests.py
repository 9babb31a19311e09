"""Parameter signatures, and the mapping found from them alone: :func:`param_signature`,
:func:`suggest_from_signatures`.

A trace captured in ``stats`` mode keeps no parameter tensors, only a :class:`ParamSignature` of
each, and :func:`suggest_from_signatures` finds from those the same mapping that
:func:`~tensorparity.mapping.suggest_mapping` finds from the tensors.

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

import itertools
import math
from collections import defaultdict
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from tensorparity.checkpoint import TensorEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.errors import CorruptCheckpointError, UsageError
from tensorparity.mapping._content import ContentMatcher, Match, Tick, _Edge, _perm_transform
from tensorparity.mapping._signatures import NameAffinity, detect_prefixes, rope_rows, stats_distance, tensor_stats
from tensorparity.mapping.multi import Chain, Concat, Split
from tensorparity.mapping.suggest import Suggestion, _suggest
from tensorparity.mapping.transforms import Rearrange, Reshape, Transform, Transpose, parse_dtype

__all__ = ["SCHEMA", "ParamSignature", "param_signature", "suggest_from_signatures"]

SCHEMA = "tensorparity.signature/1"
_MASK = (1 << 32) - 1
_CACHE = 1 << 22  # positions of weights kept per device
_CHUNK = 1 << 24  # int64 elements per product off the CPU
_MAX_SLICES = 512  # slices tried per fused tensor, as for full tensors
_STATS_DISTANCE = 0.05  # statistics further apart pair nothing (no element-wise check is possible)
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
    rows = _sums(w[:, :width], words.T)
    grid = words.view(r, width // k, k)
    cols = sum((_sums(w[:, q::k][:, :r], grid[:, :, q]) for q in range(k)), np.zeros((2, width // k), np.uint64))
    summary = None
    if stats:
        try:
            summary = tensor_stats(t)
        except (RuntimeError, TypeError, ValueError):  # complex, or a dtype float64 cannot take
            summary = None
    return ParamSignature(shape, t.dtype, _pack(rows), _pack(cols & np.uint64(_MASK)), summary)


# --- keys: what equal content looks like in signatures -----------------------------------------------

class _View:
    """A signature's digests as NumPy, and the keys that equal content shares."""

    def __init__(self, sig: ParamSignature) -> None:
        self.sig, self.shape = sig, sig.shape
        self.rows, self.cols = sig.rows.numpy(), sig.cols.numpy()
        self.nonunit = [i for i, s in enumerate(sig.shape) if s != 1]
        self.flat = len(self.nonunit) <= 1
        self.const = self._constant()

    def _constant(self) -> int | None:
        """The element's word when every element is the same one-word element."""
        if _per_element(self.sig.dtype) != 1 or not len(self.rows) or (self.rows != self.rows[0]).any() or (
                self.cols != self.cols[0]).any():
            return None
        n = self.sig.matrix[1]
        lane0, lane1 = int(self.rows[0]) & _MASK, (int(self.rows[0]) >> 32) & _MASK
        w = _weights(n, torch.device("cpu")).to(torch.int64).sum(1).tolist()
        x = lane1 * pow(w[1] & _MASK, -1, 1 << 32) & _MASK  # lane 1 sums to an odd number: invertible
        return x if x * w[0] & _MASK == lane0 else None

    def key(self) -> tuple[Any, ...]:
        """Equal for equal bytes (in shapes of one matrix, or any shape when constant)."""
        if self.const is not None:
            return ("const", self.const)
        return ("flat", int(self.cols[0])) if self.flat else ("rows", self.rows.tobytes())

    def permuted_key(self, perm: tuple[int, ...]) -> tuple[Any, ...] | None:
        """:meth:`key` of ``t.permute(perm)``; ``None`` where signatures cannot tell."""
        moved = [p for p in perm if self.shape[p] != 1]
        if self.const is not None or moved == sorted(moved):
            return self.key()
        return ("rows", self.cols.tobytes()) if len(self.nonunit) == 2 else None

    def slicer(self, dim: int) -> tuple[str, Any] | None:
        """How slices along ``dim`` show: by elements, rows or columns; ``None``: they do not."""
        if self.flat:
            return ("elems", None) if self.nonunit == [dim] else None
        if dim == self.nonunit[0]:
            return ("rows", self.rows)
        return ("cols", self.cols) if len(self.nonunit) == 2 and dim == self.nonunit[1] else None

    def slice_key(self, how: tuple[str, Any], offset: int, size: int) -> tuple[Any, ...] | None:
        mode, digests = how
        if mode == "elems":
            return ("elems", self.rows[offset:offset + size].tobytes())
        if size > 1:
            return (mode, digests[offset:offset + size].tobytes())
        return ("flat", int(digests[offset])) if len(self.nonunit) == 2 else None

    def part_key(self, mode: str, transposed: bool, size: int) -> tuple[Any, ...] | None:
        """The key a slice equal to this tensor (transposed) has, for :meth:`slice_key`."""
        if mode == "elems":
            return ("elems", self.rows.tobytes()) if self.flat else None
        if size == 1:
            return ("flat", int(self.cols[0])) if self.flat else None
        ours = self.cols if (mode == "rows") == transposed else self.rows
        return (mode, ours.tobytes())


# --- the matcher -------------------------------------------------------------------------------------

class _SignatureMatcher:
    """:class:`~._content.ContentMatcher`'s stages on signatures; its bookkeeping does the pairing
    (one-to-one, names deciding among equal content), so both find the same pairs."""

    def __init__(self, a: list[TensorEntry], b: list[TensorEntry], names: NameAffinity,
                 sigs: tuple[dict[str, ParamSignature], dict[str, ParamSignature]]) -> None:
        self.core = ContentMatcher(a, b, names)
        self.views = tuple({e.key: _View(side[e.key]) for e in pool} for side, pool in zip(sigs, (a, b)))

    def run(self) -> list[Match]:
        for stage in (self._identical, self._permuted, lambda: self._concat(1), lambda: self._concat(0), self._rope,
                      self._statistics):
            if not self.core.free[0] or not self.core.free[1]:
                break
            stage()
        return self.core.matches

    def _free(self, side: int) -> list[_View]:
        return [self.views[side][k] for k in self.core.free[side]]

    def _table(self, side: int, group: Any, key: Any) -> dict[Any, dict[Any, list[str]]]:
        table: dict[Any, dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
        for k in self.core.free[side]:
            v = self.views[side][k]
            g = group(v)
            if g is not None:
                table[g][key(v)].append(k)
        return table

    def _identical(self) -> None:
        table = self._table(1, lambda v: (v.sig.dtype, v.sig.numel), _View.key)
        edges = []
        for ka in list(self.core.free[0]):
            va = self.views[0][ka]
            for kb in self.core._cap(ka, table.get((va.sig.dtype, va.sig.numel), {}).get(va.key(), [])):
                shape = self.views[1][kb].shape
                if shape == va.shape:
                    edges.append(_Edge(ka, kb, None, "identical"))
                    continue
                perm = self._same_when_permuted(va, shape)
                edges.append(_Edge(ka, kb, Reshape(shape), "reshape", cost=1.0) if perm is None else
                             _Edge(ka, kb, _perm_transform(perm), "transpose" if len(shape) == 2 else "permute",
                                   cost=0.5))
        self.core._assign(edges)

    @staticmethod
    def _same_when_permuted(va: _View, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if sorted(shape) != sorted(va.shape) or not 2 <= len(shape) <= 4:
            return None
        for perm in itertools.permutations(range(len(shape))):
            if tuple(va.shape[p] for p in perm) == shape and va.permuted_key(perm) == va.key():
                return perm
        return None

    def _permuted(self) -> None:
        def kind(v: _View) -> tuple[torch.dtype, tuple[int, ...]] | None:
            return (v.sig.dtype, tuple(sorted(v.shape))) if 2 <= len(v.shape) <= 4 else None

        kinds_a = {kind(v) for v in self._free(0)} - {None}
        table = self._table(1, lambda v: (v.sig.dtype, v.shape) if kind(v) in kinds_a else None, _View.key)
        edges = []
        for ka in list(self.core.free[0]):
            va = self.views[0][ka]
            if kind(va) is None:
                continue
            for perm in itertools.permutations(range(len(va.shape))):
                shape = tuple(va.shape[p] for p in perm)
                group = table.get((va.sig.dtype, shape))
                moved = [p for p in perm if va.shape[p] != 1]
                if not group or moved == sorted(moved) or (key := va.permuted_key(perm)) is None:
                    continue
                edges += [_Edge(ka, kb, _perm_transform(perm), "transpose" if len(va.shape) == 2 else "permute")
                          for kb in self.core._cap(ka, group.get(key, []))]
        self.core._assign(edges)

    def _concat(self, fused: int) -> None:
        for kf in list(self.core.free[fused]):
            if kf not in self.core.free[fused]:
                continue
            found = self._find_parts(fused, kf)
            if found is None:
                continue
            keys, dim, transposed, sizes, chosen = found
            a: tuple[str, ...]
            b: tuple[str, ...]
            if fused == 1:
                t: Transform = Concat(dim) if not transposed else Chain((Concat(1 - dim), Transpose(0, 1)))
                a, b, method = keys, (kf,), "concat"
            else:
                split = Split(dim, None, len(keys)) if len(set(sizes)) == 1 else Split(dim, sizes)
                t = split if not transposed else Chain((split, Transpose(0, 1)))
                a, b, method = (kf,), keys, "split"
            note = "a part was chosen by name among tensors of equal content" if chosen else ""
            self.core._accept(a, b, t, method, "medium" if chosen else "high", note)

    def _find_parts(self, fused: int, kf: str) -> tuple[tuple[str, ...], int, bool, tuple[int, ...], bool] | None:
        side, vf = 1 - fused, self.views[fused][kf]
        pool = [k for k in self.core.free[side] if (v := self.views[side][k]).sig.dtype == vf.sig.dtype
                and 0 < v.sig.numel < vf.sig.numel and len(v.shape) == len(vf.shape)]
        if len(pool) < 2 or not vf.shape:
            return None
        for transposed, dim in itertools.product((False, True), range(len(vf.shape))):
            if transposed and len(vf.shape) != 2:
                continue

            def shape_of(k: str, transposed: bool = transposed) -> tuple[int, ...]:
                shape = self.views[side][k].shape
                return tuple(reversed(shape)) if transposed else shape

            fits = [k for k in pool if all(s == f for i, (s, f) in enumerate(zip(shape_of(k), vf.shape)) if i != dim)]
            how = vf.slicer(dim)
            if len(fits) < 2 or sum(shape_of(k)[dim] for k in fits) < vf.shape[dim] or how is None:
                continue
            table: dict[tuple[int, Any], list[str]] = defaultdict(list)
            for k in fits:
                size = shape_of(k)[dim]
                if (key := self.views[side][k].part_key(how[0], transposed, size)) is not None:
                    table[(size, key)].append(k)
            walked = self._walk(vf, how, dim, sorted({s for s, _ in table}), table, kf, fused)
            if walked is not None:
                keys, chosen = walked
                return keys, dim, transposed, tuple(shape_of(k)[dim] for k in keys), chosen
        return None

    def _walk(self, vf: _View, how: tuple[str, Any], dim: int, sizes: list[int],
              table: dict[tuple[int, Any], list[str]], kf: str, fused: int) -> tuple[tuple[str, ...], bool] | None:
        """Depth-first: the slices along ``dim``, from offset 0, that are whole parts."""
        total, budget, names, order = vf.shape[dim], [_MAX_SLICES], self.core.names, self.core.order[1 - fused]

        def score(k: str) -> float:
            return names.score(k, kf) if fused == 1 else names.score(kf, k)

        def walk(offset: int, used: tuple[str, ...], chosen: bool) -> tuple[tuple[str, ...], bool] | None:
            if offset == total:
                return (used, chosen) if len(used) >= 2 else None
            for size in sizes:
                if offset + size > total or budget[0] <= 0:
                    continue
                budget[0] -= 1
                key = vf.slice_key(how, offset, size)
                keys = [k for k in table.get((size, key), []) if k not in used] if key is not None else []
                if keys:
                    best = max(keys, key=lambda k: (score(k), -order[k]))
                    found = walk(offset + size, (*used, best), chosen or len(keys) > 1)
                    if found is not None:
                        return found
            return None

        return walk(0, (), False)

    def _rope(self) -> None:
        def kind(v: _View) -> tuple[torch.dtype, tuple[int, ...]] | None:
            return (v.sig.dtype, v.shape) if len(v.shape) in (1, 2) and v.shape[0] >= 4 else None

        kinds_a = {kind(v) for v in self._free(0)} - {None}
        table = self._table(1, lambda v: kind(v) if kind(v) in kinds_a else None, lambda v: v.rows.tobytes())
        edges = []
        for ka in list(self.core.free[0]):
            va = self.views[0][ka]
            group = table.get(kind(va)) if kind(va) is not None else None
            if not group:
                continue
            n, seen = va.shape[0], set()
            heads = [h for h in range(1, n // 4 + 1) if (n // 2) % h == 0]
            for h, inverse in itertools.product(heads, (False, True)):
                found = rope_rows(n, h, inverse)
                if found is None or tuple(found[1].tolist()) in seen:
                    continue
                pattern, rows = found
                seen.add(tuple(rows.tolist()))
                hits = group.get(va.rows[rows.numpy()].tobytes(), [])
                if not hits:
                    continue
                if len(va.shape) == 2:
                    left, right = pattern.split(" -> ")
                    pattern = f"{left} c -> {right} c"
                how = "interleaved pairs -> rotary halves" if inverse else "rotary halves -> interleaved pairs"
                edges += [_Edge(ka, kb, Rearrange(pattern, (("h", h), ("two", 2))), "rope",
                                note=f"RoPE head permutation, {how}") for kb in self.core._cap(ka, hits)]
        self.core._assign(edges)

    def _statistics(self) -> None:
        """Close statistics, same (or transposed 2-D) shape: low confidence, as for full tensors,
        but without their element-wise check, so closer than :mod:`._content` asks."""
        by_size: dict[int, list[str]] = defaultdict(list)
        for kb in self.core.free[1]:
            if self.views[1][kb].sig.stats is not None:
                by_size[self.views[1][kb].sig.numel].append(kb)
        edges = []
        for ka in list(self.core.free[0]):
            sa = self.views[0][ka].sig
            if sa.stats is None or sa.numel <= 1:
                continue
            for kb in by_size.get(sa.numel, []):
                sb = self.views[1][kb].sig
                transposed = len(sa.shape) == 2 and sb.shape == tuple(reversed(sa.shape)) != sa.shape
                if sb.shape != sa.shape and not transposed:
                    continue
                dist = stats_distance(sa.stats, sb.stats or ())
                if dist <= _STATS_DISTANCE:
                    edges.append(_Edge(ka, kb, Transpose(0, 1) if transposed else None, "statistics", cost=dist,
                                       note=f"close statistics (distance {dist:.2g}; elements not compared)"))
        self.core._assign(edges, low=True)


# --- the suggestion ----------------------------------------------------------------------------------

def _meta(sigs: MappingABC[str, ParamSignature], side: str) -> dict[str, torch.Tensor]:
    bad = [k for k, s in sigs.items() if not isinstance(k, str) or not isinstance(s, ParamSignature)]
    if bad:
        raise UsageError(f"signatures of {side} must map names to ParamSignature; not: {', '.join(map(str, bad[:5]))}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
                         fix="pass {name: param_signature(tensor)} for each side")
    return {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in sigs.items()}


def suggest_from_signatures(a: MappingABC[str, ParamSignature], b: MappingABC[str, ParamSignature], /, *,
                            source_a: str = "", source_b: str = "") -> Suggestion:
    """Suggest the mapping from A's keys to B's from parameter signatures alone, as
    :func:`~tensorparity.mapping.suggest_mapping` does from the tensors: names first, then
    identical content, transposes, concatenations and splits, the RoPE row permutation, and
    (where signatures carry statistics) close statistics.

    Args:
        a, b: ``{parameter name: ParamSignature}`` of each side (from :func:`param_signature`).
        source_a, source_b: what the signatures are of, for the suggestion's report.

    Returns:
        A :class:`~tensorparity.mapping.Suggestion`, checked against the signatures' shapes.

    Raises:
        UsageError: a value is not a :class:`ParamSignature`.

    Example:
        >>> w, bias = torch.arange(6.0).view(2, 3), torch.ones(3)
        >>> a = {"enc.0.w": param_signature(w), "enc.0.b": param_signature(bias)}
        >>> b = {"layers.0.weight": param_signature(w.T.contiguous()), "layers.0.bias": param_signature(bias)}
        >>> [r.to_dict() for r in suggest_from_signatures(a, b).mapping.rules]  # doctest: +NORMALIZE_WHITESPACE
        [{'a': 'enc.{i}.w', 'b': 'layers.{i}.weight', 'transform': {'transpose': [0, 1]}},
         {'a': 'enc.{i}.b', 'b': 'layers.{i}.bias'}]
    """
    ckpt_a, ckpt_b = open_checkpoint(_meta(a, "A")), open_checkpoint(_meta(b, "B"))
    try:
        # The bare keys _suggest hands over: the same prefixes, found the same way.
        prefix_a, prefix_b = detect_prefixes(list(ckpt_a), list(ckpt_b))
        sigs = ({k[len(prefix_a):]: s for k, s in a.items()}, {k[len(prefix_b):]: s for k, s in b.items()})

        def find(pool_a: list[TensorEntry], pool_b: list[TensorEntry], names: NameAffinity,
                 tick: Tick | None) -> list[Match]:
            return _SignatureMatcher(pool_a, pool_b, names, sigs).run()

        found = _suggest(ckpt_a, ckpt_b, False, None, find)
    finally:
        ckpt_a.close()
        ckpt_b.close()
    return replace(found, source_a=source_a or f"signatures of {len(a)} parameters",
                   source_b=source_b or f"signatures of {len(b)} parameters")
