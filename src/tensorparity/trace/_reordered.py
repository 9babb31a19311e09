"""Failing comparisons that may hold the same values in another order (another layout, not a
bug): the reorderings the mapping gave a layer's siblings, tried at once on the engine's workers
(:func:`carry_layouts`), and a sorted-values check armed for :mod:`._origin` to run on demand
(:func:`sorted_values`). Split from :mod:`._jobs`, which builds and runs the comparisons."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from tensorparity.numerics import Pair, TensorComparison, Tolerance, compare_pairs
from tensorparity.trace._jobs import Given, Job
from tensorparity.trace._layout import Gathered, feature_axis
from tensorparity.trace._measure import compare_stats, relative_error

__all__ = ["carry_layouts", "sorted_comparison", "sorted_values"]


def carry_layouts(jobs: list[Job], layers: Sequence[Any], tol: Tolerance, workers: int | None = None) -> dict[int, str]:
    """Failing activations of a layer without a layout, compared again through the reordering the
    mapping gave one of its siblings (the layers under the same parent), on ``workers`` threads:
    an activation between two reordered layers (the SiLU between a feed-forward's ``up`` and
    ``down``, its inputs and gradients) carries their reordering. Where the reordered comparison
    passes it replaces the failing one (the layer is then compared through that layout, as if the
    mapping had said it); where it fails too, the failure stands. Returns each such layer's index
    and what was done to its activations."""
    known: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for job in jobs:
        if job.owner is not None and isinstance(job.a, Gathered) and job.a.index is not None:
            module = layers[job.owner].match.a.module
            found = known.setdefault(module.rpartition(".")[0], [])
            if not any(x is job.a.index or torch.equal(x, job.a.index) for _, x in found):
                found.append((layers[job.owner].match.a.name, job.a.index))
    tries: list[tuple[Job, str, Pair]] = []
    for job in jobs:
        r = job.result
        if (r is None or r.passed or job.stats or job.owner is None or r.numel <= 1 or r.status == "shape"
                or job.ra.kind == "param_grad" or job.ra.shape != job.rb.shape or layers[job.owner].match.layout is not None
                or not _stats_agree(job, tol)):
            continue
        axis = feature_axis(layers[job.owner].match.b.module_type)
        shape = job.ra.shape
        size = shape[axis] if -len(shape) <= axis < len(shape) else -1
        for name, index in known.get(layers[job.owner].match.a.module.rpartition(".")[0], []):
            if len(index) == size:
                tries.append((job, name, Pair(f"{job.key} (features reordered as {name}'s)",
                                              Gathered((job.a,), axis, index), job.b, None, job.tolerance)))
    carried: dict[int, str] = {}
    for (job, name, _), found in zip(tries, compare_pairs((t[2] for t in tries), tol, workers=workers), strict=True):
        if found.passed and not job.result.passed:  # type: ignore[union-attr]
            job.result, job.error = found, relative_error(found, job.rb.stats or job.ra.stats)
            carried[job.owner] = f"features reordered as {name}'s (its sibling's layout, carried)"  # type: ignore[index]
    return carried


def sorted_values(jobs: list[Job], layers: Sequence[Any], tol: Tolerance) -> None:
    """Arm each failing comparison of two stored tensors with a check, run only when asked
    (:meth:`Job.is_reordered`, by :mod:`._origin` where a layer's ancestor does not settle it):
    are their values the same when sorted — a parameter gradient's all together, an activation's or
    its gradient's along the layer's feature axis (token by token)? Equal values in another order
    mean another layout (rows permuted: the weights are stored differently, heads reordered).
    Statistics are compared first (a reordering keeps them), so an inherited error costs no sort."""
    for job in jobs:
        r = job.result
        kind = job.ra.kind
        if not (r is not None and not r.passed and not job.stats and r.numel > 1 and r.status != "shape"):
            continue
        if kind not in ("param_grad", "output", "grad_output", "input", "grad_input") or job.ra.shape != job.rb.shape:
            continue
        axis = feature_axis(layers[job.owner].match.b.module_type) if job.owner is not None else -1
        job.check = functools.partial(_sorted_check, job, tol, 0 if kind == "param_grad" else axis)


def _stats_agree(job: Job, tol: Tolerance) -> bool:
    """Whether the two records' statistics agree (or one side has none): a reordering keeps them."""
    sa, sb = job.ra.stats, job.rb.stats
    return sa is None or sb is None or compare_stats(job.key, replace(job.ra, stored=False),
                                                     replace(job.rb, stored=False), job.tolerance or tol).passed


def _sorted_check(job: Job, tol: Tolerance, axis: int) -> TensorComparison | None:
    if not _stats_agree(job, tol):
        return None
    a, b = job.a.load(), job.b.load()
    if not (a.is_floating_point() and b.is_floating_point()):
        return None
    if job.ra.kind == "param_grad":
        a, b = a.reshape(-1), b.reshape(-1)
    found = sorted_comparison(job.key, a, b, axis, tol, job.tolerance)
    return found if found.passed else None


def sorted_comparison(key: str, a: torch.Tensor, b: torch.Tensor, axis: int, tol: Tolerance,
                      tolerance: Tolerance | None = None) -> TensorComparison:
    """Two tensors compared with their values sorted along ``axis``: passes when they hold the same
    values in another order (compare and replay tell a layout from a bug with it)."""
    what = "values sorted" if a.dim() == 1 else "values sorted along the features"
    pair = Pair(f"{key} ({what})", Given(a.sort(dim=axis).values), Given(b.sort(dim=axis).values), None, tolerance)
    return next(compare_pairs([pair], tol, workers=1))
