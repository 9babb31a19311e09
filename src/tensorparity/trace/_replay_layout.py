"""Replay's comparisons in another layout: a returned output in the recorded shape, outputs that
hold the reference's values reordered (a layout, not an own error), and which modules of a group
hold the features that differ (see :mod:`tensorparity.trace.replay`)."""

from __future__ import annotations

from typing import Any

import torch

from tensorparity.checkpoint.tracefolder.records import TraceRecord
from tensorparity.numerics import Pair, TensorComparison, Tolerance
from tensorparity.trace._jobs import same_but_unit_dims
from tensorparity.trace._layout import Layout
from tensorparity.trace._reordered import sorted_comparison

__all__ = ["as_recorded", "differing_parts", "reorder_first", "reordered"]


def as_recorded(t: torch.Tensor, record: TraceRecord) -> torch.Tensor:
    """``t`` in the recorded shape where the two differ in unit dimensions only."""
    return t.reshape(record.shape) if same_but_unit_dims(record.shape, t.shape) else t


def reordered(jobs: list[Pair], results: tuple[TensorComparison, ...], axis: int, tol: Tolerance) -> bool:
    """Whether every output that differs holds the reference's values in another order along the
    features (token by token): another layout (rows of the weights permuted), not another result."""
    bad = [(j, t) for j, t in zip(jobs, results, strict=True) if not t.passed]
    if not bad:
        return False
    for job, t in bad:
        if t.status == "shape":
            return False
        a, b = job.a.load(), job.b.load()
        if not (a.is_floating_point() and b.is_floating_point()) or a.dim() == 0:
            return False
        if not sorted_comparison(job.key, a, b, axis, tol, job.tolerance).passed:
            return False
    return True


def differing_parts(want: torch.Tensor, mine: torch.Tensor, result: TensorComparison, layout: Layout,
                     sizes_a: list[int], sizes_b: list[int]) -> tuple[list[int], list[int]]:
    """Which of A's and B's modules in a group hold the features outside tolerance."""
    tol = result.tolerance
    bad = ((want.double() - mine.double()).abs() > tol.atol + tol.rtol * mine.double().abs())
    axis = layout.axis_b % bad.dim()
    features = bad.movedim(axis, 0).reshape(bad.shape[axis], -1).any(1).nonzero().flatten()
    at_a = layout.out_index[features] if layout.out_index is not None else features

    def parts(positions: torch.Tensor, sizes: list[int]) -> list[int]:
        ends = torch.tensor(sizes).cumsum(0)
        return sorted({int(torch.searchsorted(ends, p, right=True)) for p in positions.tolist()})

    return parts(at_a, sizes_a), parts(features, sizes_b)


def reorder_first(args: tuple[Any, ...], kwargs: dict[str, Any], index: torch.Tensor,
                   axis: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with its first tensor's features reordered (the layout's input index)."""
    args = list(args)  # type: ignore[assignment]
    for i, v in enumerate(args):
        if isinstance(v, torch.Tensor):
            args[i] = v.index_select(axis, index.to(v.device))  # type: ignore[index]
            return tuple(args), kwargs
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return tuple(args), {**kwargs, k: v.index_select(axis, index.to(v.device))}
    return tuple(args), kwargs
