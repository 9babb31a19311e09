"""DTensors in a trace (FSDP2, tensor parallel): recorded as each rank's local shard with its
placement, or gathered; and assembled back from every rank's shards, as DCP does (private:
:func:`tensorparity.trace.assemble_tensor` and ``Trace.open`` are the public face).

A placement, as a record keeps it (JSON)::

    {"mesh": [2], "placements": ["Shard(0)"], "global_shape": [6, 4], "offset": [3, 0]}

``offset`` is where this rank's local tensor starts in the global one (``dtensor="local"``);
``"gathered": true`` replaces it where the record holds the full tensor (``dtensor="gather"``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from tensorparity.checkpoint.tracefolder.format import TraceError

__all__ = ["DTENSOR_MODES", "as_recorded", "assemble_tensor", "is_dtensor", "placement_of", "sharded"]

DTENSOR_MODES = ("local", "gather")
_SHARD = re.compile(r"(?:_Strided)?Shard\(dim=(-?\d+)")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (about 0.4 s
    and 500 modules that every command would pay at start-up): a DTensor exists only once the
    user's code imported that module, so it is looked up where Python keeps imported modules."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None) if module is not None else None
    return dtensor is not None and isinstance(t, dtensor)


def _placement_text(p: Any) -> str:
    text = repr(p)
    m = _SHARD.match(text)
    if m:
        return f"Shard({m.group(1)})"
    if text.startswith("Partial"):
        op = getattr(p, "reduce_op", "sum")
        return f"Partial({op})"
    return "Replicate()" if text.startswith("Replicate") else text


def _offset(dt: Any) -> tuple[list[int], list[int]]:
    """This rank's local shape and its offset in the global tensor."""
    shape, mesh, placements = tuple(dt.shape), dt.device_mesh, dt.placements
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        return [int(s) for s in local], [int(o) for o in offset]
    except (ImportError, TypeError, AttributeError):  # a torch without the helper: even chunks, as torch.chunk
        local_t = dt._local_tensor
        offset = [0] * len(shape)
        coord = mesh.get_coordinate() or [0] * mesh.ndim
        for mesh_dim, p in enumerate(placements):
            if p.is_shard():
                dim = p.dim % len(shape)
                size = -(-shape[dim] // mesh.size(mesh_dim))
                offset[dim] += size * coord[mesh_dim]
        return list(local_t.shape), offset


def placement_of(dt: Any, *, gathered: bool) -> dict[str, Any]:
    """A DTensor's placement as a record keeps it (see the module docstring)."""
    mesh = dt.device_mesh
    out: dict[str, Any] = {"mesh": [int(s) for s in mesh.shape],
                           "placements": [_placement_text(p) for p in dt.placements],
                           "global_shape": [int(s) for s in dt.shape]}
    if mesh.mesh_dim_names:
        out["mesh_dims"] = list(mesh.mesh_dim_names)
    if gathered:
        out["gathered"] = True
    else:
        out["offset"] = _offset(dt)[1]
        coord = mesh.get_coordinate()
        out["coordinate"] = [int(c) for c in coord] if coord is not None else None
    return out


def as_recorded(dt: Any, how: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The plain tensor to record for a DTensor, and its placement: the local shard
    (``local``), or the full tensor gathered from every rank (``gather``: a collective, so every
    rank records the same DTensors in the same order, which capture's hooks do)."""
    if how == "gather":
        full = dt.detach().full_tensor()
        return full, placement_of(dt, gathered=True)
    return dt.detach().to_local(), placement_of(dt, gathered=False)


def sharded(placement: dict[str, Any] | None) -> bool:
    """Whether a record holds a piece of a larger tensor (a local shard or a partial sum)."""
    if not placement or placement.get("gathered"):
        return False
    return any(p.startswith(("Shard", "Partial")) for p in placement.get("placements", ()))


def _check_placement(placement: Any, rank: int, key: str) -> tuple[list[int], list[int], bool]:
    try:
        shape = [int(s) for s in placement["global_shape"]]
        offset = [int(o) for o in placement["offset"]]
        partial = any(str(p).startswith("Partial") for p in placement["placements"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{key}: rank {rank}'s placement is malformed ({exc})",
                         fix="capture the trace again with dtensor='local'") from exc
    if len(offset) != len(shape):
        raise TraceError(f"{key}: rank {rank}'s offset {offset} does not fit the global shape {shape}",
                         fix="capture the trace again with dtensor='local'")
    return shape, offset, partial


def assemble_tensor(pieces: Sequence[tuple[int, dict[str, Any], torch.Tensor]], *, key: str = "tensor") -> torch.Tensor:
    """The global tensor from every rank's local shard, as DCP assembles a sharded tensor.

    Args:
        pieces: ``(rank, placement, local tensor)`` for every rank that holds a piece
            (placements as records keep them: ``global_shape`` and ``offset``).
        key: the record's key, for messages.

    Replicated pieces (the same block on several ranks) are taken once; ``Partial`` pieces are
    summed. Pieces that leave part of the tensor uncovered, or fall outside it, are refused with
    the rank.

    Example:
        >>> a, b = torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 12.0).reshape(3, 2)
        >>> p = lambda off: {"global_shape": [6, 2], "offset": [off, 0], "placements": ["Shard(0)"]}
        >>> assemble_tensor([(0, p(0), a), (1, p(3), b)]).flatten().tolist() == list(range(12))
        True
    """
    if not pieces:
        raise TraceError(f"{key}: no rank holds a piece of this tensor", fix="pass the folder that holds every rank")
    shape, _, partial = _check_placement(pieces[0][1], pieces[0][0], key)
    first = pieces[0][2]
    out = torch.zeros(shape, dtype=first.dtype)
    covered = torch.zeros(shape, dtype=torch.int32)
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for rank, placement, local in pieces:
        got_shape, offset, _ = _check_placement(placement, rank, key)
        if got_shape != shape:
            raise TraceError(f"{key}: rank {rank} says the global shape is {got_shape}, rank {pieces[0][0]} "
                             f"{shape}", fix="compare traces of one run: every rank must come from the same capture")
        if local.dim() != len(shape) or any(o < 0 or o + s > g for o, s, g in zip(offset, local.shape, shape)):
            raise TraceError(f"{key}: rank {rank}'s shard {list(local.shape)} at offset {offset} falls outside the "
                             f"global shape {shape}", fix="capture the trace again with dtensor='local'")
        block = (tuple(offset), tuple(local.shape))
        if block in seen and not partial:
            continue  # a replica of a block already placed
        seen.add(block)
        index = tuple(slice(o, o + s) for o, s in zip(offset, local.shape))
        if partial:
            out[index] += local.to(out.dtype)
        else:
            out[index] = local.to(out.dtype)
        covered[index] += 1
    if out.numel() and not partial and (covered != 1).any():
        holes = int((covered == 0).sum())
        twice = int((covered > 1).sum())
        what = (f"{holes} of {out.numel()} elements are in no rank's shard" if holes
                else f"{twice} elements are in two ranks' different shards")
        ranks = sorted({r for r, _, _ in pieces})
        raise TraceError(f"{key}: the shards of ranks {ranks} do not tile the tensor {shape}: {what}",
                         fix="pass the folder holding every rank of one capture (a rank may be missing)")
    return out
