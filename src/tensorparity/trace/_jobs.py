"""The comparisons two aligned traces make: one job per pair of records, run through the
:mod:`tensorparity.numerics` engine (by value) or :func:`~._measure.compare_stats` (by statistics).

**Layouts.** A pair of layers whose mapping rule transforms their weights (see :mod:`._layout`)
compares A's activations transformed into B's layout: outputs and gradients w.r.t. outputs
gathered (and joined, for a fused group), inputs and gradients w.r.t. input gathered (the modules
of a group share one input tensor, and the gradient recorded for it is the whole gradient that
tensor receives, so the first module's stands for the group). Under statistics, a reordering keeps
min, max, mean, std and norm, and joined parts combine exactly.

**Default tolerance (float32-aware).** Unless the user gave ``atol``, ``rtol`` or ``exact``, each
comparison's atol is raised to ``2·√n`` ulps of the compared dtype at the tensor's own largest
magnitude, ``n`` the number of terms a value of it sums: the larger feature size of the layer's
input and output for activations and their gradients, the number of rows (tokens) the layer saw
for a parameter gradient. Summation-order noise is a few ulps of the scale a sum builds, growing
like √n; a bug is orders of magnitude larger. A parameter gradient's terms are the output gradient
times what the parameter multiplied: where those cancel (a bias before a BatchNorm sums to zero
but for rounding), its atol is at least ``2·n`` ulps of its largest term, the bound for n terms
each carrying the noise of the gradient they came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tensorparity.checkpoint.tracefolder.records import TraceRecord, tensor_stats
from tensorparity.checkpoint.tree import LazyTensor, TensorEntry
from tensorparity.numerics import Pair, TensorComparison, Tolerance, compare_pairs
from tensorparity.trace._layout import Gathered, Layout, combine_stats
from tensorparity.trace._measure import compare_stats, relative_error, stats_error
from tensorparity.trace.align import LayerMatch, RecordSource, TraceLayer

__all__ = ["Given", "Job", "overridden", "RecordTensor", "Reshaped", "same_but_unit_dims", "float_tolerance", "layout_jobs", "make_job", "pair_records", "run_jobs"]

ULPS_PER_ROOT = 2.0  # ulps of the tensor's scale per √(terms summed), see the module docstring


@dataclass(frozen=True)
class RecordTensor:
    """A record's tensor, loaded from its trace on demand (what the engine's pairs hold)."""

    source: RecordSource
    record: TraceRecord

    def load(self) -> torch.Tensor:
        return self.source.load(self.record)


def loadable(source: RecordSource, record: TraceRecord) -> Any:
    """A stored record's tensor for the engine: a located :class:`TensorEntry` where the trace can
    say where its bytes are (identical tensors are then recognised from the shards' bytes)."""
    lazy = getattr(source, "lazy", None)
    if callable(lazy) and record.stored:
        t = lazy(record)
        if isinstance(t, LazyTensor):
            return TensorEntry(record.key, t.shape, t.dtype, t.nbytes, t.location, t.loader, _span=t.span,
                               _verify=t.verify)
    return RecordTensor(source, record)


@dataclass
class Job:
    """One pair of tensors to compare, and where its result goes."""

    slot: str
    owner: int | None  # index of the layer match, None: a parameter outside aligned layers
    key: str
    key_b: str
    a: Any  # a Loadable
    b: Any
    ra: TraceRecord
    rb: TraceRecord
    stats: bool = False
    param: bool = False
    tolerance: Tolerance | None = None
    result: TensorComparison | None = None
    error: float = 0.0
    reordered: TensorComparison | None = None  # a failing comparison's values compared sorted (passed)
    check: Any = None  # the sorted-values check, run once on demand (see _reordered.sorted_values)
    run: Any = None  # the job's own comparison, (Tolerance) -> TensorComparison (see _reordered.plan_carries)
    carried_by: str | None = None  # the sibling whose reordering this activation was compared through

    def is_reordered(self) -> bool:
        """Whether this failing comparison holds the same values in another order (checked once)."""
        if self.check is not None:
            self.reordered, self.check = self.check(), None
        return self.reordered is not None


def pair_records(ra: Sequence[TraceRecord], rb: Sequence[TraceRecord]) -> list[tuple[TraceRecord, TraceRecord]]:
    """Records of one kind of two paired layers: by path; a lone record on each side pairs whatever
    its path (``0`` vs ``last_hidden_state``), and with the other side's first record when no path
    is shared (an attention returning ``(output, weights)`` against one returning the output)."""
    if len(ra) == 1 and len(rb) == 1:
        return [(ra[0], rb[0])]
    by_path = {r.path: r for r in rb}
    pairs = [(r, by_path[r.path]) for r in ra if r.path in by_path]
    if not pairs and ra and rb and 1 in (len(ra), len(rb)):
        pairs = [(ra[0], rb[0])]
    return pairs


def make_job(src_a: RecordSource, src_b: RecordSource, slot: str, owner: int | None, ra: TraceRecord,
             rb: TraceRecord, *, param: bool = False) -> Job | None:
    """The comparison of two records: by value when both stored their tensor, else by statistics
    (``None`` when a side kept neither)."""
    stats = not (ra.stored and rb.stored)
    if stats and ((ra.stats is None and not ra.stored) or (rb.stats is None and not rb.stored)):
        return None
    b = loadable(src_b, rb)
    if same_but_unit_dims(ra.shape, rb.shape):
        # [1, T, D] against [T, D] (a position embedding looked up with or without a batch dim):
        # the same values, compared in A's shape.
        b, rb = Reshaped(b, tuple(ra.shape)), replace(rb, shape=tuple(ra.shape))
    return Job(slot, owner, ra.key, rb.key, loadable(src_a, ra), b, ra, rb, stats=stats, param=param)


def same_but_unit_dims(a: Sequence[int], b: Sequence[int]) -> bool:
    """Two different shapes that hold the same elements in the same order, differing only in
    dimensions of size 1.

    Example:
        >>> same_but_unit_dims((1, 12, 48), (12, 48)), same_but_unit_dims((2, 3), (3, 2))
        (True, False)
    """
    return tuple(a) != tuple(b) and [d for d in a if d != 1] == [d for d in b if d != 1]


@dataclass(frozen=True)
class Reshaped:
    """A loadable seen in another shape of the same elements (unit dimensions added or removed)."""

    inner: Any
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        return self.inner.load().reshape(self.shape)


# --- the float32-aware default tolerance -----------------------------------------------------------

def is_default(tol: Tolerance) -> bool:
    """Whether the user left the tolerance to the defaults (no atol, rtol, exact or ulps given)."""
    return tol.atol is None and tol.rtol is None and not tol.exact and tol.ulps is None


def _last(shape: Sequence[int] | None) -> int:
    return int(shape[-1]) if shape else 1


def summands(layer: TraceLayer, kind: str) -> int:
    """How many terms a value of this record of ``layer`` sums (see the module docstring)."""
    outs = layer.of_kind("output", "model_output")
    if kind == "param_grad":
        shape = outs[0].shape if outs else ()
        return max(1, math.prod(shape) // max(1, _last(shape)))
    ins = [r for r in layer.of_kind("input", "model_input") if r.shape]
    return max(1, _last(outs[0].shape if outs else None), _last(ins[0].shape if ins else None))


def float_tolerance(tol: Tolerance, n: int) -> Tolerance:
    """``tol`` with atol raised to ``2·√n`` ulps of the tensor's scale (see the module docstring).

    Example:
        >>> float_tolerance(Tolerance(), 64).ulps
        16.0
    """
    return replace(tol, ulps=ULPS_PER_ROOT * math.sqrt(max(1, n)))


def overridden(tol: Tolerance, key: str) -> bool:
    """Whether one of ``tol``'s per-key overrides sets the tolerance of ``key``.

    Example:
        >>> t = Tolerance(overrides=((r"\\.norm", Tolerance(atol=1e-3)),))
        >>> overridden(t, "layers.0.norm/0/output"), overridden(t, "layers.0.fc/0/output")
        (True, False)
    """
    return any(re.search(pattern, key) for pattern, _ in tol.overrides)


def assign_tolerances(jobs: Sequence[Job], layers: Sequence[Any], tol: Tolerance) -> int:
    """Give each job the float32-aware default tolerance where the user left tolerances alone:
    not where ``tol`` sets atol, rtol, exact or ulps, nor for a key one of its overrides matches
    (a per-key tolerance, e.g. a measured noise floor, is the user's word for that key). Returns
    how many jobs got it."""
    if not is_default(tol):
        return 0
    raised = 0
    for job in jobs:
        if overridden(tol, job.key):
            _joined_override(job, tol)
            continue
        if job.owner is not None:
            n = summands(layers[job.owner].match.a, job.ra.kind)
        else:
            n = max(1, math.prod(job.rb.shape) // max(1, _last(job.rb.shape))) if job.rb.shape else 1
        job.tolerance = float_tolerance(tol, n)
        raised += 1
        scale = summand_scale(layers[job.owner].match.b, job.rb) if job.param and job.owner is not None else 0.0
        if scale:
            # A parameter gradient that sums to (nearly) nothing (a bias before a BatchNorm) is
            # all rounding: the n terms it sums each carry the noise of the gradient they came
            # from, and cancel; its error is bounded by n ulps of its largest term, not by its
            # own tiny scale.
            atol = ULPS_PER_ROOT * n * _dtype_eps(job.rb.dtype) * scale
            if atol > 1e-5:
                job.tolerance = replace(job.tolerance, atol=atol)
    return raised


def _joined_override(job: Job, tol: Tolerance) -> None:
    """A job joining several records (a fused group) whose keys carry their own tolerances (a
    measured noise floor per record) is judged by the loosest of them, not by its first part's."""
    # The parts: records' tensors in memory, or located in their shards (keyed by record).
    keys = [p.record.key if isinstance(p, RecordTensor) else p.key for p in getattr(job.a, "parts", ())
            if isinstance(p, (RecordTensor, TensorEntry))]
    if len(keys) < 2:
        return
    dtype = getattr(torch, job.ra.dtype, torch.float32)
    chosen = [tol.for_key(key, dtype) for key in keys]
    job.tolerance = Tolerance(atol=max(c.atol for c in chosen), rtol=max(c.rtol for c in chosen),
                              equal_nan=tol.equal_nan, statistic=tol.statistic)


def _dtype_eps(name: str) -> float:
    dtype = getattr(torch, name, None)
    return torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 0.0


def _magnitude(r: TraceRecord | None) -> float:
    s = r.stats if r is not None else None
    if s is None or not (math.isfinite(s.min) and math.isfinite(s.max)):
        return 0.0
    return max(abs(s.min), abs(s.max))


def summand_scale(layer: TraceLayer, param: TraceRecord) -> float:
    """The largest term a parameter gradient of ``layer`` sums: the gradient w.r.t. output times
    what the parameter multiplied — the layer's input for a weight where it was recorded, else (and
    for a bias or a norm's weight) the larger of 1 and the layer's output, a stand-in of the same
    order for the activations a layer passes on."""
    gout = _magnitude(next(iter(layer.of_kind("grad_output")), None))
    if not gout:
        return 0.0
    out = _magnitude(next(iter(layer.of_kind("output")), None))
    inp = _magnitude(next(iter(layer.of_kind("input")), None)) if len(param.shape) > 1 else 0.0
    return gout * max(1.0, inp or out)


# --- layouts ----------------------------------------------------------------------------------------

def _with_path(layer: TraceLayer, kind: str, path: str) -> TraceRecord | None:
    recs = layer.of_kind(kind)
    if len(recs) == 1:
        return recs[0]
    return next((r for r in recs if r.path == path), None) if recs else None


def _joined_shape(shapes: Sequence[tuple[int, ...]], axis: int, size: int | None) -> tuple[int, ...] | None:
    """The shape of parts joined on ``axis`` (then gathered to ``size``); ``None`` when they disagree."""
    first = list(shapes[0])
    if not -len(first) <= axis < len(first):
        return None
    ax = axis % len(first)
    for s in shapes[1:]:
        if len(s) != len(first) or any(x != y for i, (x, y) in enumerate(zip(s, first, strict=True)) if i != ax):
            return None
    first[ax] = sum(s[ax] for s in shapes) if size is None else size
    return tuple(first)


def layout_jobs(src_a: RecordSource, src_b: RecordSource, owner: int, match: LayerMatch,
                notes: list[str]) -> list[tuple[str, Job]]:
    """The jobs of a layer pair with a :class:`~._layout.Layout` (slot, job); what could not be
    transformed is compared without the transform, or left out, and ``notes`` say why."""
    layout: Layout = match.layout
    group_a, group_b = match.group_a or (match.a,), match.group_b or (match.b,)
    jobs: list[tuple[str, Job]] = []
    if layout.in_index is not None and not group_a[0].of_kind("input"):
        notes.append(f"the layout reorders {match.name_a}'s input features, but its inputs were not recorded "
                     "(capture with inputs=True to compare them)")
    for slot, kind in (("forward", "output"), ("inputs", "input"), ("backward", "grad_output"),
                       ("backward", "grad_input")):
        joined = kind in ("output", "grad_output")
        index = layout.out_index if joined else layout.in_index
        for ra0, rb0 in pair_records(group_a[0].of_kind(kind), group_b[0].of_kind(kind)):
            parts_a = [_with_path(x, kind, ra0.path) for x in group_a] if joined else [ra0]
            parts_b = [_with_path(x, kind, rb0.path) for x in group_b] if joined else [rb0]
            if any(p is None for p in parts_a + parts_b):
                notes.append(f"{kind} of {match.name_a}: a module of the group recorded none at "
                             f"{ra0.path or 'its output'}")
                continue
            job = _layout_job(src_a, src_b, owner, slot, layout, index, parts_a, parts_b, notes)  # type: ignore[arg-type]
            if job is not None:
                jobs.append((slot, job))
    return jobs


def _layout_job(src_a: RecordSource, src_b: RecordSource, owner: int, slot: str, layout: Layout,
                index: torch.Tensor | None, parts_a: list[TraceRecord], parts_b: list[TraceRecord],
                notes: list[str]) -> Job | None:
    ra0, rb0 = parts_a[0], parts_b[0]
    axis_a, axis_b = layout.axis_a, layout.axis_b
    shape_a = _joined_shape([p.shape for p in parts_a], axis_a, None)
    shape_b = _joined_shape([p.shape for p in parts_b], axis_b, None)
    if shape_a is not None and index is not None:
        size = shape_a[axis_a] if -len(shape_a) <= axis_a < len(shape_a) else -1
        fits = size == len(index) and (not index.numel() or int(index.max()) < size)
        shape_a = _joined_shape([shape_a], axis_a, len(index)) if fits else None
    if shape_a is None or shape_b is None or shape_a != shape_b:
        size = f"reorders {len(index)} features on axis {axis_a}" if index is not None else "joins the group"
        notes.append(f"the layout of {ra0.layer} ({layout.describe()}) does not fit its {ra0.kind} "
                     f"{ra0.path or ''} (A {list(ra0.shape)}, B {list(rb0.shape)}; the layout {size}): "
                     "compared without it")
        return make_job(src_a, src_b, slot, owner, ra0, rb0)
    stored = all(p.stored for p in parts_a + parts_b)
    stats_a = combine_stats([p.stats for p in parts_a]) if (len(parts_a) > 1 or index is not None) else ra0.stats
    stats_b = combine_stats([p.stats for p in parts_b]) if len(parts_b) > 1 else rb0.stats
    if not stored and (stats_a is None or stats_b is None):
        notes.append(f"the {ra0.kind} of {ra0.layer}: a side kept neither tensors nor statistics")
        return None
    ra = replace(ra0, shape=shape_a, stats=stats_a, stored=stored)
    rb = replace(rb0, shape=shape_b, stats=stats_b, stored=stored)
    # A side with one part and nothing to reorder is the record itself: located in its file
    # where the trace says where (identical bytes are then recognised without loading them).
    a = (loadable(src_a, ra0) if len(parts_a) == 1 and index is None
         else Gathered(tuple(loadable(src_a, p) for p in parts_a), axis_a, index))
    b = loadable(src_b, rb0) if len(parts_b) == 1 else Gathered(tuple(loadable(src_b, p) for p in parts_b), axis_b)
    return Job(slot, owner, ra0.key, rb0.key, a, b, ra, rb, stats=not stored)


# --- running ----------------------------------------------------------------------------------------

def run_jobs(jobs: list[Job], tol: Tolerance, workers: int | None) -> None:
    """Compare every job: tensors through the engine, statistics where a side stored none."""
    tensor_jobs = [j for j in jobs if not j.stats]
    repeats = _repeats(tensor_jobs, tol)
    tensor_jobs = [j for j in tensor_jobs if id(j) not in repeats]
    pairs = (Pair(j.key, j.a, j.b, j.key_b if j.key_b != j.key else None, j.tolerance, j.run) for j in tensor_jobs)
    for job, result in zip(tensor_jobs, compare_pairs(pairs, tol, workers=workers), strict=True):
        job.result = result
        job.error = relative_error(result, job.rb.stats or job.ra.stats)
        job.run = None  # it holds the job: the cycle would keep both traces' files until a collection
    for job, first in repeats.values():
        assert first.result is not None
        job.result = replace(first.result, key=job.key, key_b=job.key_b if job.key_b != job.key else None)
        job.error = relative_error(job.result, job.rb.stats or job.ra.stats)
    for job in jobs:
        if job.stats:
            sa = job.ra.stats if job.ra.stats is not None or not job.ra.stored else tensor_stats(job.a.load())
            sb = job.rb.stats if job.rb.stats is not None or not job.rb.stored else tensor_stats(job.b.load())
            job.result = compare_stats(job.key, job.ra, job.rb, job.tolerance or tol, stats_a=sa, stats_b=sb,
                                       key_b=job.key_b)
            job.error = stats_error(job.result, sa, sb)


def _repeats(jobs: list[Job], tol: Tolerance) -> dict[int, tuple[Job, Job]]:
    """Jobs that would compare the very bytes an earlier job compares, under the same tolerance:
    a tensor recorded again unchanged, stored once on both sides (``same_as`` in the manifests: a
    container's output is its last child's). ``id(job) -> (job, the earlier job)``: its result is
    the earlier one's under its own keys, measured once."""
    first: dict[tuple[Any, ...], Job] = {}
    repeats: dict[int, tuple[Job, Job]] = {}
    for job in jobs:
        a, b = job.a, job.b
        if job.run is not None or not (isinstance(a, TensorEntry) and isinstance(b, TensorEntry)):
            continue
        span_a, span_b = a.byte_span(), b.byte_span()
        if span_a is None or span_b is None:
            continue
        resolved = (job.tolerance or tol).for_key(job.key, a.dtype_name, b.dtype_name)
        where = (span_a.path, span_a.offset, span_a.nbytes, a.dtype_name, tuple(a.shape),
                 span_b.path, span_b.offset, span_b.nbytes, b.dtype_name, tuple(b.shape), resolved)
        earlier = first.setdefault(where, job)
        if earlier is not job:
            repeats[id(job)] = (job, earlier)
    return repeats


@dataclass(frozen=True)
class Given:
    """A tensor already in memory, as the engine's pairs take it."""

    tensor: torch.Tensor

    def load(self) -> torch.Tensor:
        return self.tensor
