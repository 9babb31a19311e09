"""Failing comparisons that may hold the same values in another order (another layout, not a
bug): the reorderings the mapping gave a layer's siblings, tried on the engine's workers with every other
comparison (:func:`plan_carries`), and a sorted-values check armed for :mod:`._origin` to run on demand
(:func:`sorted_values`). Split from :mod:`._jobs`, which builds and runs the comparisons."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from tensorparity.numerics import Pair, TensorComparison, Tolerance, compare_pairs
from tensorparity.numerics.engine import any_outside, compare_pair
from tensorparity.trace._jobs import Given, Job
from tensorparity.trace._layout import Gathered, feature_axis
from tensorparity.trace._measure import compare_stats

__all__ = ["carried_layers", "plan_carries", "sorted_comparison", "sorted_values"]


def plan_carries(jobs: list[Job], layers: Sequence[Any], tol: Tolerance) -> None:
    """Arm each activation of a layer without a layout that may carry the reordering the mapping
    gave one of its siblings (the layers under the same parent): an activation between two
    reordered layers (the SiLU between a feed-forward's ``up`` and ``down``, its inputs and
    gradients) holds their reordering. Such a job then compares itself (:func:`_carried`, on the
    engine's workers with every other job): where the reordered comparison passes and the plain
    one fails, it stands for the layer (compared through that layout, as if the mapping had said
    it); else the plain comparison stands. Candidates: the job's statistics agree (a reordering
    keeps them) and the sibling's reordering fits its feature axis."""
    known: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for job in jobs:
        if job.owner is not None and isinstance(job.a, Gathered) and job.a.index is not None:
            module = layers[job.owner].match.a.module
            found = known.setdefault(module.rpartition(".")[0], [])
            if not any(x is job.a.index or torch.equal(x, job.a.index) for _, x in found):
                found.append((layers[job.owner].match.a.name, job.a.index))
    if not known:
        return
    for job in jobs:
        if (job.stats or job.owner is None or math.prod(job.ra.shape) <= 1 or job.ra.kind == "param_grad"
                or tuple(job.ra.shape) != tuple(job.rb.shape) or layers[job.owner].match.layout is not None):
            continue
        siblings = known.get(layers[job.owner].match.a.module.rpartition(".")[0], [])
        if not siblings:
            continue
        axis = feature_axis(layers[job.owner].match.b.module_type)
        shape = job.ra.shape
        size = shape[axis] if -len(shape) <= axis < len(shape) else -1
        tries = [(name, Pair(f"{job.key} (features reordered as {name}'s)", Gathered((job.a,), axis, index), job.b,
                             None, job.tolerance)) for name, index in siblings if len(index) == size]
        if tries and _stats_agree(job, tol):
            job.run = functools.partial(_carried, job, tries)


PROBE = 4096  # elements read to guess whether a plain comparison fails (a reordering fails at once)


def _carried(job: Job, tries: list[tuple[str, Pair]], tol: Tolerance) -> TensorComparison:
    """The comparison of an armed job (:func:`plan_carries`): its plain comparison, or where that
    fails and a sibling's reordering passes, the reordered one (``job.carried_by`` names it).

    Whichever is likelier to stand is measured first: where the plain comparison's first elements
    already fail (values in another order fail at once), the reordered ones are measured and the
    plain one only scanned to its first failing element; else the plain one is measured and the
    reordered ones only if it fails. The result is the same either way."""
    plain = Pair(job.key, job.a, job.b, job.key_b if job.key_b != job.key else None, job.tolerance)
    tolerance = job.tolerance or tol
    if any_outside(plain, tolerance, PROBE):
        for name, pair in tries:
            found = compare_pair(pair, tol)
            if not found.passed:
                continue
            # The plain comparison is judged at the reordered one's atol (both scale with max|b|).
            if any_outside(plain, found.tolerance) is True:
                job.carried_by = name
                return found
            result = compare_pair(plain, tol)
            if result.passed:
                return result
            job.carried_by = name
            return found
        return compare_pair(plain, tol)
    result = compare_pair(plain, tol)
    if result.passed:
        return result
    for name, pair in tries:
        found = compare_pair(pair, tol)
        if found.passed:
            job.carried_by = name
            return found
    return result


def carried_layers(jobs: Sequence[Job]) -> dict[int, str]:
    """Each layer one of whose activations was compared through a sibling's reordering, and how."""
    return {job.owner: f"features reordered as {job.carried_by}'s (its sibling's layout, carried)"
            for job in jobs if job.carried_by is not None and job.owner is not None}


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
