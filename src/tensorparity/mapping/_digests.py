"""The mapping found from parameter signatures alone: :func:`suggest_from_signatures` runs the
content matcher's stages (:mod:`._content`) on row and column digests (:mod:`._param_signature`)
instead of tensors, and generalises the pairs into rules as :func:`~.suggest.suggest_mapping` does.
What a signature can and cannot show is said in :mod:`._param_signature`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping as MappingABC
from dataclasses import replace
from typing import Any

import torch

from tensorparity.checkpoint import TensorEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.errors import UsageError
from tensorparity.mapping._content import ContentMatcher, Match, Tick, _Edge, _perm_transform
from tensorparity.mapping._param_signature import _MASK, ParamSignature, _per_element, _weights
from tensorparity.mapping._signatures import NameAffinity, detect_prefixes, rope_rows, stats_distance
from tensorparity.mapping.multi import Chain, Concat, Split
from tensorparity.mapping.suggest import Suggestion, _suggest
from tensorparity.mapping.transforms import Rearrange, Reshape, Transform, Transpose

__all__ = ["suggest_from_signatures"]

_MAX_SLICES = 512  # slices tried per fused tensor, as for full tensors
_STATS_DISTANCE = 0.05  # statistics further apart pair nothing (no element-wise check is possible)


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
        >>> from tensorparity.mapping import param_signature
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
