"""Partners by tensor content, cheapest first, for keys whose names do not match.

Stages, each on the keys the earlier ones left: identical bytes (also under a reshape), permuted
dims (transpose of a ``Conv1D``), concatenations (fused ``qkv`` / ``w13`` on either side, parts
plain or transposed), the RoPE head permutation, a dtype cast, and last shape + statistics
signatures (close, not equal: low confidence). Candidates are grouped by dtype and size before
anything is read, tensors are read one at a time, and only digests and statistics are kept.
When several tensors share one content (LayerNorm weights that are all ones), names decide
(:class:`~tensorparity.mapping._signatures.NameAffinity`, then module order).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from tensorparity.checkpoint import TensorEntry
from tensorparity.mapping._signatures import (
    NameAffinity,
    entry_digest,
    lower_precision,
    ordinal_group,
    relative_error,
    rope_rows,
    stats_distance,
    tensor_digest,
    tensor_stats,
)
from tensorparity.mapping.multi import Chain, Concat, Split
from tensorparity.mapping.transforms import Cast, Permute, Rearrange, Reshape, Transform, Transpose

__all__ = ["ContentMatcher", "Match", "Tick"]

Tick = Callable[[str, int, int], None]  # (stage, tensors done in it, tensors in it)
_MAX_EDGES = 64  # candidates kept per key when many tensors share one content
_MAX_SLICES = 512  # slice digests tried per fused tensor
_MAX_STATS = 64  # statistics candidates per key
_STATS_DISTANCE = 0.1  # signatures further apart are not candidates
_MAX_RELATIVE_ERROR = 0.1  # |a - b| / |b| above this is no partner
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMERIC_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)  # a dtype an op does not support


@dataclass(frozen=True)
class Match:
    """Keys ``a`` of side A are keys ``b`` of side B through ``transform``, found by ``method``."""

    a: tuple[str, ...]
    b: tuple[str, ...]
    transform: Transform | None
    method: str
    confidence: str  # high: content proves it; medium: content, partner chosen by name; low: statistics
    note: str = ""


@dataclass(frozen=True)
class _Edge:
    a: str
    b: str
    transform: Transform | None
    method: str
    cost: float = 0.0  # a tie-breaker against names: reshape over identity, statistics error
    note: str = ""


def _perm_transform(perm: tuple[int, ...]) -> Transform:
    moved = [i for i, p in enumerate(perm) if p != i]
    return Transpose(*moved) if len(moved) == 2 else Permute(perm)


def _chain(*steps: Transform | None) -> Transform | None:
    kept = [s for s in steps if s is not None]
    return None if not kept else kept[0] if len(kept) == 1 else Chain(tuple(kept))


class ContentMatcher:
    """Pairs the tensors of two pools by content; :meth:`run` returns the :class:`Match` es."""

    def __init__(self, a: Sequence[TensorEntry], b: Sequence[TensorEntry], names: NameAffinity,
                 tick: Tick | None = None) -> None:
        self.entries = ({e.key: e for e in a}, {e.key: e for e in b})
        self.order = ({e.key: i for i, e in enumerate(a)}, {e.key: i for i, e in enumerate(b)})
        self.free: tuple[dict[str, None], dict[str, None]] = (dict.fromkeys(self.entries[0]),
                                                              dict.fromkeys(self.entries[1]))
        self.names = names
        self.tick = tick or (lambda stage, n, total: None)
        self.matches: list[Match] = []
        self._digests: dict[tuple[int, str, str], bytes | None] = {}
        self._stats: dict[tuple[int, str], tuple[float, ...]] = {}

    def run(self) -> list[Match]:
        for stage in (self._identical, self._permuted, lambda: self._concat(1), lambda: self._concat(0),
                      self._rope, self._cast, self._statistics):
            if not self.free[0] or not self.free[1]:
                break
            stage()
        return self.matches

    # --- helpers ---------------------------------------------------------------------------------

    def _digest(self, side: int, key: str, view: str = "",
                make: Callable[[], torch.Tensor | None] | None = None) -> bytes | None:
        """Cached digest of a key's tensor (``view`` names a derived tensor ``make`` builds)."""
        slot = (side, key, view)
        if slot not in self._digests:
            if not view:
                self._digests[slot] = entry_digest(self.entries[side][key])
            else:
                assert make is not None
                t = make()
                self._digests[slot] = None if t is None else tensor_digest(t)
        return self._digests[slot]

    def _load(self, side: int, key: str, *, raw: bool = False) -> torch.Tensor | None:
        """The tensor (``None`` for a meta tensor). ``raw``: its bytes as integers of the same size,
        for stages that only move elements: permutes and slices then work for every dtype (fp8,
        bool, complex) and cost the same."""
        t = self.entries[side][key].load()
        if t.device.type == "meta":
            return None
        t = t.detach()
        same = _INTS.get(t.element_size()) if raw else None
        return t.view(same) if same is not None and t.dtype != same else t

    def _pool(self, side: int) -> list[TensorEntry]:
        return [self.entries[side][k] for k in self.free[side]]

    def _cap(self, a: str, bs: Sequence[str]) -> Sequence[str]:
        """Many B tensors share A's content: keep those whose names fit best."""
        if len(bs) <= _MAX_EDGES:
            return bs
        return sorted(bs, key=lambda b: (-self.names.score(a, b), self.order[1][b]))[:_MAX_EDGES]

    def _accept(self, a: tuple[str, ...], b: tuple[str, ...], transform: Transform | None, method: str,
                confidence: str, note: str = "") -> None:
        for k in a:
            del self.free[0][k]
        for k in b:
            del self.free[1][k]
        self.names.learn(a, b)
        self.matches.append(Match(a, b, transform, method, confidence, note))

    def _assign(self, edges: Iterable[_Edge], *, low: bool = False) -> None:
        """Accept edges one-to-one: lone pairs first, then groups of equal content by name."""
        edges = list(edges)
        root: dict[tuple[int, str], tuple[int, str]] = {}

        def find(x: tuple[int, str]) -> tuple[int, str]:
            while root.setdefault(x, x) != x:
                root[x] = root[root[x]]
                x = root[x]
            return x

        for e in edges:
            root[find((0, e.a))] = find((1, e.b))
        groups: dict[tuple[int, str], list[_Edge]] = defaultdict(list)
        for e in edges:
            groups[find((0, e.a))].append(e)
        comps = sorted(groups.values(), key=lambda es: (len({e.a for e in es}) + len({e.b for e in es}) > 2,
                                                        min(self.order[0][e.a] for e in es)))
        for comp in comps:
            a_keys = sorted({e.a for e in comp}, key=self.order[0].__getitem__)
            b_keys = sorted({e.b for e in comp}, key=self.order[1].__getitem__)
            rank_a, rank_b = _ranks(a_keys), _ranks(b_keys)

            def key(e: _Edge, rank_a: dict[str, int] = rank_a, rank_b: dict[str, int] = rank_b) -> tuple[float, ...]:
                name = self.names.score(e.a, e.b) + (20.0 if rank_a[e.a] == rank_b[e.b] else 0.0)
                first = e.cost if low else 0.0  # statistics: the closest first; content: names first
                return first, -(name - 30.0 * e.cost), self.order[0][e.a], self.order[1][e.b]

            ambiguous = len(a_keys) > 1 or len(b_keys) > 1
            for e in sorted(comp, key=key):
                if e.a in self.free[0] and e.b in self.free[1]:
                    note = e.note
                    if ambiguous and not low:
                        note = (f"{len(a_keys)} A and {len(b_keys)} B tensors share this content; paired by name"
                                + (f"; {note}" if note else ""))
                    confidence = "low" if low else "medium" if ambiguous else "high"
                    self._accept((e.a,), (e.b,), e.transform, e.method, confidence, note)

    # --- stages ----------------------------------------------------------------------------------

    def _identical(self) -> None:
        """Same bytes: same dtype and size, equal digests (a different shape is a reshape)."""
        table: dict[tuple[torch.dtype, int], dict[bytes, list[str]]] = defaultdict(lambda: defaultdict(list))
        sizes = {(e.dtype, e.numel) for e in self._pool(0)}
        for e in self._pool(1):
            if (e.dtype, e.numel) in sizes and (d := self._digest(1, e.key)) is not None:
                table[(e.dtype, e.numel)][d].append(e.key)
        edges = []
        pool = self._pool(0)
        for n, ea in enumerate(pool):
            self.tick("identical bytes", n, len(pool))
            group = table.get((ea.dtype, ea.numel))
            if not group or (d := self._digest(0, ea.key)) is None:
                continue
            for kb in self._cap(ea.key, group.get(d, [])):
                shape = tuple(self.entries[1][kb].shape)
                if shape == tuple(ea.shape):
                    edges.append(_Edge(ea.key, kb, None, "identical"))
                    continue
                # Same bytes in another shape. A constant tensor is also its own transpose: say
                # so when it is, as its neighbours (random weights) will be transposed.
                perm = self._same_when_permuted(ea, shape, d)
                edges.append(_Edge(ea.key, kb, Reshape(shape), "reshape", cost=1.0) if perm is None else
                             _Edge(ea.key, kb, _perm_transform(perm), "transpose" if len(shape) == 2 else "permute",
                                   cost=0.5))
        self._assign(edges)

    def _same_when_permuted(self, ea: TensorEntry, shape: tuple[int, ...], digest: bytes) -> tuple[int, ...] | None:
        if sorted(shape) != sorted(ea.shape) or not 2 <= len(shape) <= 4:
            return None
        t = self._load(0, ea.key, raw=True)
        for perm in itertools.permutations(range(len(shape))):
            if t is not None and tuple(ea.shape[p] for p in perm) == shape and tensor_digest(t.permute(perm)) == digest:
                return perm
        return None

    def _views_table(self, pool_b: Iterable[TensorEntry], view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     view_name: str = "", *, raw: bool = False) -> dict[tuple[torch.dtype, tuple[int, ...]],
                                                                       dict[bytes, list[str]]]:
        """Digests of B tensors (or of a ``view`` of them), keyed by dtype and shape."""
        table: dict[tuple[torch.dtype, tuple[int, ...]], dict[bytes, list[str]]]
        table = defaultdict(lambda: defaultdict(list))
        for eb in pool_b:
            make = None if view is None else (lambda k=eb.key: _apply(view, self._load(1, k, raw=raw)))
            d = self._digest(1, eb.key, view_name, make)
            if d is not None:
                table[(eb.dtype, tuple(eb.shape))][d].append(eb.key)
        return table

    def _permuted(self) -> None:
        """Same bytes after permuting dims (2-4 d): a ``Conv1D`` weight is a transposed ``Linear``."""
        def kind(e: TensorEntry) -> tuple[torch.dtype, tuple[int, ...]]:
            return e.dtype, tuple(sorted(e.shape))

        kinds_b = {kind(e) for e in self._pool(1) if 2 <= len(e.shape) <= 4}
        pool = [e for e in self._pool(0) if kind(e) in kinds_b]
        kinds_a = {kind(e) for e in pool}
        table = self._views_table(e for e in self._pool(1) if kind(e) in kinds_a)
        edges = []
        for n, ea in enumerate(pool):
            self.tick("permuted dims", n, len(pool))
            t = None
            for perm in itertools.permutations(range(len(ea.shape))):
                shape = tuple(ea.shape[p] for p in perm)
                group = table.get((ea.dtype, shape))
                # Moving only dims of size 1 keeps the bytes: that was a reshape, found before.
                if not group or [p for p in perm if ea.shape[p] != 1] == sorted(p for p in perm if ea.shape[p] != 1):
                    continue
                t = self._load(0, ea.key, raw=True) if t is None else t
                if t is None:
                    break
                d = tensor_digest(t.permute(perm))
                edges += [_Edge(ea.key, kb, _perm_transform(perm), "transpose" if len(ea.shape) == 2 else "permute")
                          for kb in self._cap(ea.key, group.get(d, []))]
        self._assign(edges)

    def _concat(self, fused: int) -> None:
        """A tensor of side ``fused`` is the concatenation of several tensors of the other side."""
        todo = list(self.free[fused])
        for n, kf in enumerate(todo):
            self.tick("concatenations", n, len(todo))
            if kf not in self.free[fused]:
                continue
            found = self._find_parts(fused, kf)
            if found is None:
                continue
            keys, dim, transposed, sizes, chosen = found
            equal = len(set(sizes)) == 1
            a: tuple[str, ...]
            b: tuple[str, ...]
            if fused == 1:  # parts in A, fused in B
                t: Transform = (Concat(dim) if not transposed else Chain((Concat(1 - dim), Transpose(0, 1))))
                a, b, method = keys, (kf,), "concat"
            else:
                split = Split(dim, None, len(keys)) if equal else Split(dim, sizes)
                t = split if not transposed else Chain((split, Transpose(0, 1)))
                a, b, method = (kf,), keys, "split"
            note = "a part was chosen by name among tensors of equal content" if chosen else ""
            self._accept(a, b, t, method, "medium" if chosen else "high", note)

    def _find_parts(self, fused: int, kf: str) -> tuple[tuple[str, ...], int, bool, tuple[int, ...], bool] | None:
        side = 1 - fused
        ef = self.entries[fused][kf]
        pool = [e for e in self._pool(side) if e.dtype == ef.dtype and 0 < e.numel < ef.numel
                and len(e.shape) == len(ef.shape)]
        if len(pool) < 2 or not ef.shape:
            return None
        tensor: torch.Tensor | None = None
        for transposed, dim in itertools.product((False, True), range(len(ef.shape))):
            if transposed and len(ef.shape) != 2:
                continue

            def shape_of(e: TensorEntry, transposed: bool = transposed) -> tuple[int, ...]:
                return tuple(reversed(e.shape)) if transposed else tuple(e.shape)

            fits = [e for e in pool if all(s == f for i, (s, f) in enumerate(zip(shape_of(e), ef.shape)) if i != dim)]
            if len(fits) < 2 or sum(shape_of(e)[dim] for e in fits) < ef.shape[dim]:
                continue
            table: dict[tuple[int, bytes], list[str]] = defaultdict(list)
            for e in fits:
                make = (lambda k=e.key: _apply(lambda x: x.T, self._load(side, k, raw=True))) if transposed else None
                d = self._digest(side, e.key, "T" if transposed else "", make)
                if d is not None:
                    table[(shape_of(e)[dim], d)].append(e.key)
            tensor = self._load(fused, kf, raw=True) if tensor is None else tensor
            if tensor is None:
                return None
            found = self._walk(tensor, dim, sorted({s for s, _ in table}), table, kf, fused)
            if found is not None:
                keys, chosen = found
                sizes = tuple(shape_of(self.entries[side][k])[dim] for k in keys)
                return keys, dim, transposed, sizes, chosen
        return None

    def _walk(self, t: torch.Tensor, dim: int, sizes: list[int], table: dict[tuple[int, bytes], list[str]],
              kf: str, fused: int) -> tuple[tuple[str, ...], bool] | None:
        """Depth-first: the slices of ``t`` along ``dim``, from offset 0, that are whole parts."""
        total, budget = t.shape[dim], [_MAX_SLICES]
        score = (lambda k: self.names.score(k, kf)) if fused == 1 else (lambda k: self.names.score(kf, k))

        def walk(offset: int, used: tuple[str, ...], chosen: bool) -> tuple[tuple[str, ...], bool] | None:
            if offset == total:
                return (used, chosen) if len(used) >= 2 else None
            for size in sizes:
                if offset + size > total or budget[0] <= 0:
                    continue
                budget[0] -= 1
                keys = [k for k in table.get((size, tensor_digest(t.narrow(dim, offset, size))), []) if k not in used]
                if keys:
                    best = max(keys, key=lambda k: (score(k), -self.order[1 - fused][k]))
                    found = walk(offset + size, (*used, best), chosen or len(keys) > 1)
                    if found is not None:
                        return found
            return None

        return walk(0, (), False)

    def _rope(self) -> None:
        """Same rows in the other RoPE order (HF <-> Meta Llama ``wq``/``wk``), any head count."""
        def kind(e: TensorEntry) -> tuple[torch.dtype, tuple[int, ...]] | None:
            return (e.dtype, tuple(e.shape)) if len(e.shape) in (1, 2) and e.shape[0] >= 4 else None

        kinds_b = {kind(e) for e in self._pool(1)} - {None}
        pool = [e for e in self._pool(0) if kind(e) in kinds_b]
        kinds_a = {kind(e) for e in pool}
        # Rows are permuted: the first column alone rules out nearly every wrong head count.
        first = self._views_table((e for e in self._pool(1) if kind(e) in kinds_a),
                                  lambda t: t if t.dim() == 1 else t[:, 0], "col0", raw=True)
        edges = []
        for n, ea in enumerate(pool):
            self.tick("RoPE permutation", n, len(pool))
            group = first.get((ea.dtype, tuple(ea.shape)))
            t = self._load(0, ea.key, raw=True) if group else None
            if t is None or group is None:
                continue
            rows_n, seen = ea.shape[0], set()
            heads = [h for h in range(1, rows_n // 4 + 1) if (rows_n // 2) % h == 0]
            for h, inverse in itertools.product(heads, (False, True)):
                found = rope_rows(rows_n, h, inverse)
                if found is None or tuple(found[1].tolist()) in seen:
                    continue
                pattern, rows = found
                seen.add(tuple(rows.tolist()))
                head = t[rows] if t.dim() == 1 else t[rows, 0]
                hits = group.get(tensor_digest(head), [])
                if not hits:
                    continue
                full = tensor_digest(t[rows])
                if t.dim() == 2:
                    left, right = pattern.split(" -> ")
                    pattern = f"{left} c -> {right} c"
                how = "interleaved pairs -> rotary halves" if inverse else "rotary halves -> interleaved pairs"
                edges += [_Edge(ea.key, kb, Rearrange(pattern, (("h", h), ("two", 2))), "rope",
                                note=f"RoPE head permutation, {how}") for kb in self._cap(ea.key, hits)
                          if self._digest(1, kb) == full]
        self._assign(edges)

    def _cast(self) -> None:
        """Same values in another dtype: equal after casting both to the lower precision."""
        by_size: dict[int, list[TensorEntry]] = defaultdict(list)
        for eb in self._pool(1):
            by_size[eb.numel].append(eb)
        edges = []
        pool = self._pool(0)
        for n, ea in enumerate(pool):
            self.tick("dtype cast", n, len(pool))
            cands = [eb for eb in by_size.get(ea.numel, []) if eb.dtype != ea.dtype
                     and sorted(eb.shape) == sorted(ea.shape) and lower_precision(ea.dtype, eb.dtype) is not None]
            t = self._load(0, ea.key) if cands else None
            if t is None:
                continue
            try:
                edges += self._cast_edges(ea, t, cands)
            except _NUMERIC_ERRORS:
                continue  # a dtype torch cannot cast on this machine: no partner by cast
        self._assign(edges)

    def _cast_edges(self, ea: TensorEntry, t: torch.Tensor, cands: list[TensorEntry]) -> list[_Edge]:
        edges = []
        views: dict[tuple[tuple[int, ...], torch.dtype], bytes] = {}
        for eb in cands:
            low = lower_precision(ea.dtype, eb.dtype)
            assert low is not None

            def cast_b(key: str = eb.key, low: torch.dtype = low) -> torch.Tensor | None:
                tb = self._load(1, key)
                return None if tb is None else tb.to(low)

            d_b = self._digest(1, eb.key, f"as {low}", cast_b)
            perms = itertools.permutations(range(t.dim())) if t.dim() <= 4 else [tuple(range(t.dim()))]
            for perm in perms:
                if tuple(t.shape[p] for p in perm) != tuple(eb.shape):
                    continue
                if (perm, low) not in views:
                    views[(perm, low)] = tensor_digest(t.permute(perm).to(low))
                if d_b is None or views[(perm, low)] != d_b:
                    continue
                layout = None if list(perm) == sorted(perm) else _perm_transform(perm)
                exact = tensor_digest(t.permute(perm).to(eb.dtype)) == self._digest(1, eb.key)
                note = "" if exact else (f"values agree in {str(low).removeprefix('torch.')}; diff compares the "
                                         "two dtypes after promotion")
                cast = Cast(eb.dtype, ea.dtype) if exact else None
                edges.append(_Edge(ea.key, eb.key, _chain(layout, cast), "cast", note=note))
                break
        return edges

    def _statistics(self) -> None:
        """Close, not equal: similar statistics, then a relative error under 10% (low confidence)."""
        by_size: dict[int, list[TensorEntry]] = defaultdict(list)
        for eb in self._pool(1):
            by_size[eb.numel].append(eb)
        edges = []
        pool = self._pool(0)
        for n, ea in enumerate(pool):
            self.tick("statistics", n, len(pool))
            cands = [eb for eb in by_size.get(ea.numel, []) if ea.numel > 1 and
                     (eb.shape == ea.shape or (len(ea.shape) == 2 and tuple(eb.shape) == tuple(reversed(ea.shape))))]
            if not cands:
                continue
            sa = self._stat(0, ea.key)
            near = sorted((stats_distance(sa, self._stat(1, eb.key)), self.order[1][eb.key], eb) for eb in
                          cands[:_MAX_STATS])
            t = None
            for dist, _, eb in near[:3]:
                if dist > _STATS_DISTANCE:
                    break
                t = self._load(0, ea.key) if t is None else t
                tb = self._load(1, eb.key)
                if t is None or tb is None:
                    break
                options: list[tuple[Transform | None, torch.Tensor]] = [(None, t)] if t.shape == tb.shape else []
                options += [(Transpose(0, 1), t.T)] if t.dim() == 2 and t.T.shape == tb.shape else []
                try:
                    err, transform = min((relative_error(v, tb), i, tr) for i, (tr, v) in enumerate(options))[::2]
                except _NUMERIC_ERRORS:
                    break
                if err <= _MAX_RELATIVE_ERROR:
                    edges.append(_Edge(ea.key, eb.key, transform, "statistics", cost=err,
                                       note=f"close, not equal: relative error {err:.2g}"))
        self._assign(edges, low=True)

    def _stat(self, side: int, key: str) -> tuple[float, ...]:
        if (side, key) not in self._stats:
            t = self._load(side, key)
            try:
                self._stats[(side, key)] = tensor_stats(t) if t is not None else (math.nan,) * 5
            except _NUMERIC_ERRORS:
                self._stats[(side, key)] = (math.nan,) * 5
        return self._stats[(side, key)]


def _apply(view: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else view(t)


def _ranks(keys: Sequence[str]) -> dict[str, int]:
    """Each key's position among the keys (in checkpoint order) of its :func:`ordinal_group`."""
    seen: dict[tuple[tuple[str, ...], str], int] = defaultdict(int)
    out = {}
    for k in keys:
        g = ordinal_group(k)
        out[k] = seen[g]
        seen[g] += 1
    return out
