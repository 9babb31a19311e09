"""One trace from every rank of a DTensor capture (FSDP2, tensor parallel), as DCP assembles a
sharded checkpoint (private: ``Trace.open(folder)`` uses it).

A multi-rank trace captured with ``dtensor="local"`` holds, for each DTensor, one local shard
per rank with its placement. Opened without a rank, its records are rank 0's, except that every
sharded record becomes the global tensor: shape and statistics of the whole (merged from the
shards' statistics; the content fingerprint cannot be merged and is left empty), its tensor
assembled from every rank's shard when loaded. Records of plain tensors (activations, the
model's input and output under FSDP2, ``param_grad_local``) are rank 0's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tensorparity._dtypes import dtype_info, is_dtype_name
from tensorparity.checkpoint.tracefolder._dtensor import assemble_tensor, sharded
from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.records import TensorStats, TraceRecord
from tensorparity.checkpoint.tree import LazyTensor

__all__ = ["RankShards", "assemble_ranks", "is_sharded_trace"]

_FIX = "pass the folder that holds every rank-<r>/ of one capture, or open one rank with rank=N"


def is_sharded_trace(manifest: dict[str, Any]) -> bool:
    """Whether a rank's manifest holds local DTensor shards (``dtensor="local"``)."""
    return any(sharded(r.placement) for r in manifest["records"])


def assemble_ranks(folder: Path, manifests: dict[int, dict[str, Any]]
                   ) -> tuple[list[TraceRecord], dict[str, Any], str, dict[str, list[tuple[int, dict[str, Any]]]]]:
    """Records, provenance and mode of the assembled trace, and for each assembled key the
    ``(rank, placement)`` of its pieces. Refuses ranks missing, ranks of different world sizes or
    modes, and a sharded record that some rank lacks, naming the rank."""
    worlds = {r: m["provenance"].get("world_size") for r, m in manifests.items()}
    if len(set(worlds.values())) > 1:
        text = ", ".join(f"rank {r}: {w}" for r, w in sorted(worlds.items()))
        raise TraceError(f"the ranks come from captures of different world sizes ({text})", path=folder, fix=_FIX)
    world = next(iter(worlds.values()))
    if isinstance(world, int):
        missing = sorted(set(range(world)) - set(manifests))
        if missing:
            raise TraceError(f"the trace was captured on {world} ranks but rank{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))} {'are' if len(missing) > 1 else 'is'} missing "
                             f"(a DTensor's shards are spread over every rank)", path=folder,
                             fix="copy every rank-<r>/ folder of the capture")
    modes = {m["mode"] for m in manifests.values()}
    if len(modes) > 1:
        raise TraceError(f"the ranks were captured in different modes ({', '.join(sorted(modes))})", path=folder,
                         fix=_FIX)
    ranks = sorted(manifests)
    by_rank = {r: {rec.key: rec for rec in manifests[r]["records"]} for r in ranks}
    first = ranks[0]
    records, pieces = [], {}
    for rec in manifests[first]["records"]:
        if not sharded(rec.placement):
            records.append(rec)
            continue
        parts = []
        for r in ranks:
            other = by_rank[r].get(rec.key)
            if other is None or other.placement is None:
                raise TraceError(f"rank {r} holds no shard of this DTensor record (rank {first} does)", path=folder,
                                 key=rec.key, fix="capture the trace again: every rank runs the same capture")
            parts.append(other)
        pieces[rec.key] = [(r, p.placement) for r, p in zip(ranks, parts)]  # type: ignore[misc]
        assert rec.placement is not None
        placement = {k: v for k, v in rec.placement.items() if k not in ("offset", "coordinate")}
        placement["assembled_from"] = ranks
        records.append(dataclasses.replace(
            rec, shape=tuple(int(s) for s in rec.placement["global_shape"]), stored=all(p.stored for p in parts),
            stats=_merged_stats(parts), placement=placement))
    prov = dict(manifests[first]["provenance"])
    prov.update(rank=None, ranks=ranks, assembled=(f"DTensor records assembled from the shards of ranks "
                                                  f"{', '.join(map(str, ranks))}; the others are rank {first}'s"))
    return records, prov, manifests[first]["mode"], pieces


def _merged_stats(parts: list[TraceRecord]) -> TensorStats | None:
    """Statistics of the whole from disjoint shards' statistics (replicas counted once); the
    fingerprint cannot be merged: left empty. ``None`` for partial sums (no statistics of a sum)."""
    blocks: dict[tuple[Any, ...], TensorStats] = {}
    for p in parts:
        assert p.placement is not None
        if any(str(x).startswith("Partial") for x in p.placement.get("placements", ())) or p.stats is None:
            return None
        blocks.setdefault((tuple(p.placement.get("offset", ())), p.shape), p.stats)
    stats = list(blocks.values())
    numel = sum(s.numel for s in stats)
    nan, inf = sum(s.nan for s in stats), sum(s.inf for s in stats)
    finite = [(s, s.numel - s.nan - s.inf) for s in stats if s.numel - s.nan - s.inf > 0]
    n = sum(k for _, k in finite)
    if not n:
        return TensorStats(numel, math.nan, math.nan, math.nan, math.nan, math.nan, nan, inf, "")
    total = sum(s.mean * k for s, k in finite)
    squares = sum(s.norm * s.norm for s, _ in finite)
    mean = total / n
    std = math.sqrt(max(0.0, squares / n - mean * mean))
    return TensorStats(numel, min(s.min for s, _ in finite), max(s.max for s, _ in finite), mean, std,
                       math.sqrt(squares), nan, inf, "")


class RankShards:
    """The shards of every rank, read as one trace's (what :class:`~tensorparity.trace.Trace`
    asks of its shards: ``load``, ``lazy``, ``verify``, ``close``)."""

    def __init__(self, folder: Path, shardsets: dict[int, Any], pieces: dict[str, list[tuple[int, dict[str, Any]]]],
                 records: list[TraceRecord]) -> None:
        self.folder = folder
        self.sets = shardsets
        self.first = sorted(shardsets)[0]
        self.pieces = pieces
        self.records = {r.key: r for r in records if r.key in pieces}

    def load(self, key: str) -> torch.Tensor:
        found = self.pieces.get(key)
        if found is None:
            return self.sets[self.first].load(key)  # type: ignore[no-any-return]
        return assemble_tensor([(r, placement, self.sets[r].load(key)) for r, placement in found], key=key)

    def lazy(self, key: str) -> LazyTensor:
        if key not in self.pieces:
            return self.sets[self.first].lazy(key)  # type: ignore[no-any-return]
        rec = self.records[key]
        dtype = rec.dtype if is_dtype_name(rec.dtype) else "float32"
        nbytes = math.prod(rec.shape) * dtype_info(dtype).itemsize
        return LazyTensor(rec.shape, dtype, nbytes, f"{self.folder} (ranks {', '.join(map(str, sorted(self.sets)))})",
                          lambda: self.load(key))

    def verify(self) -> None:
        for shards in self.sets.values():
            shards.verify()

    def pending_checks(self) -> list[tuple[str, Callable[[], None]]]:
        return [check for shards in self.sets.values() for check in shards.pending_checks()]

    def close(self) -> None:
        for shards in self.sets.values():
            shards.close()
