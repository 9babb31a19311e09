"""Compare two traces layer by layer: align them (:mod:`.align`), compare every aligned layer's
forward outputs, recorded inputs and gradients through the :mod:`tensorparity.numerics` engine (by
their statistics where a side stored no tensor, :mod:`._measure`), name the first diverging layer,
and say for every mismatched layer whether it introduced its error or inherited it (:mod:`._origin`).

Parameter gradients are paired inside aligned layers by name; through a mapping they are renamed
and transformed by the mapping itself (a fused qkv's gradient is the concatenation of q's, k's
and v's), so they are compared even where the layers they belong to are fused.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.tracefolder.ahead import check_ahead
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import TraceRecord
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.errors import UsageError
from tensorparity.mapping import Mapping, MappingError, apply_mapping, load_mapping
from tensorparity.numerics import Tolerance
from tensorparity.trace._checks import provenance_checks
from tensorparity.trace._found import find_mapping
from tensorparity.trace._jobs import (
    Job,
    RecordTensor,
    assign_tolerances,
    layout_jobs,
    loadable,
    make_job,
    pair_records,
    run_jobs,
)
from tensorparity.trace._layout import Gathered, combine_stats, derive_layouts, param_shapes, reorder_of
from tensorparity.trace._layout_align import apply_layouts
from tensorparity.trace._measure import compare_stats, relative_error
from tensorparity.trace._origin import classify
from tensorparity.trace._rank_plan import compare_ranks, plan_ranks
from tensorparity.trace._ranked_report import RankedTraceReport
from tensorparity.trace._reordered import carried_layers, plan_carries, sorted_values
from tensorparity.trace._trace_report import LayerComparison, TraceReport, TraceSide, UnalignedLayer
from tensorparity.trace.align import (
    Alignment,
    LayerMatch,
    Method,
    RecordSource,
    TraceLayer,
    align_layers,
    group_layers,
)
from tensorparity.trace.live import run_like

__all__ = ["compare_stats", "compare_traces", "relative_error"]

# (slot in the layer's record, record kinds paired together)
_SLOTS = (("forward", "output"), ("forward", "model_output"), ("inputs", "input"), ("inputs", "model_input"),
          ("backward", "grad_output"), ("backward", "grad_input"), ("backward", "param_grad"))


@dataclass
class _Layer:
    """A layer pair's results while the report is built."""

    match: LayerMatch
    slots: dict[str, list[Job]] = field(default_factory=lambda: {"forward": [], "inputs": [], "backward": []})
    notes: list[str] = field(default_factory=list)
    carried: str | None = None  # a sibling's layout its activations were compared through


def compare_traces(
    a: RecordSource | str | os.PathLike[str],
    b: RecordSource | str | os.PathLike[str],
    *,
    mapping: Mapping | str | os.PathLike[str] | dict[str, Any] | None = None,
    tolerance: Tolerance | None = None,
    align: Method = "auto",
    margin: float = 10.0,
    rank: int | None = None,
    workers: int | None = None,
    inputs: Any = None,
    rank_a: int | None = None,
    rank_b: int | None = None,
    each_rank: bool = False,
) -> TraceReport | RankedTraceReport:
    """Compare two traces layer by layer, forward and backward.

    Args:
        a, b: two traces: :class:`~tensorparity.trace.Trace` objects, paths of trace folders, or
            anything with ``records``, ``provenance`` and ``load(record)``; or live models
            (``nn.Module``): a live side is run on the other side's recorded input, in its mode,
            and its backward pass starts from the other side's recorded output gradient (see
            :mod:`tensorparity.trace.live`).
        mapping: a :class:`~tensorparity.mapping.Mapping` (or its YAML file) from A's parameter
            keys to B's: layers are renamed through it, parameter gradients transformed by it.
        tolerance: how close is close enough (default: ``torch.testing``'s per dtype). Record keys
            are ``module/call/kind[/path]``, so ``overrides`` can target kinds (``/grad_input/``).
        align: ``auto``, ``name``, ``mapping`` or ``order`` (see :mod:`tensorparity.trace.align`).
        margin: a mismatched layer introduced its error when its relative error exceeds its
            input's by this factor.
        rank: which rank of multi-process trace folders (``rank-<r>/`` inside, written under
            ``torchrun``) to compare, on both sides; ``rank_a`` / ``rank_b``: on one side (or
            ``run@N`` as the path; a path that exists as written is a path). Without one, two
            multi-process traces are compared rank by rank (each rank of A against the same rank
            of B); their ranks must be complete and the same on both sides.
        workers: comparison threads (default 2).
        inputs: the input for live models (needed when both are live; else the recorded one).
        each_rank: compare the side that is one trace (one process, one chosen rank, or a live
            model) with every rank of the other, multi-process one.

    Returns:
        A :class:`~tensorparity.trace._trace_report.TraceReport`; for traces compared on several ranks a
        :class:`~tensorparity.trace._ranked_report.RankedTraceReport` (one report per rank, one verdict).

    Example:
        >>> import torch
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord, tensor_stats
        >>> class Run:  # any RecordSource: records, provenance, load(record)
        ...     def __init__(self, out):
        ...         self.tensors = {"fc/0/output": out}
        ...         self.records = [TraceRecord(0, "fc", 0, "torch.nn.Linear", "output", "", tuple(out.shape),
        ...                                     "float32", "cpu", tensor_stats(out), True)]
        ...         self.provenance = {}
        ...     def load(self, record):
        ...         return self.tensors[record.key]
        >>> x = torch.ones(2, 3)
        >>> compare_traces(Run(x), Run(x)).verdict
        'identical'
        >>> r = compare_traces(Run(x), Run(x * 1.5))
        >>> r.verdict, r.first_divergence.layer_a, r.first_divergence.origin
        ('differs', 'fc', 'introduced')
    """
    with _collector_paused():
        return _compare_traces(a, b, mapping=mapping, tolerance=tolerance, align=align, margin=margin, rank=rank,
                               workers=workers, inputs=inputs, rank_a=rank_a, rank_b=rank_b, each_rank=each_rank)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while two traces are compared: a compare makes
    thousands of records that live until its report is made, so the collector's passes over the
    older generations, each walking every object of the process, found nothing to free and cost
    5-10 % of a compare (more in a process that holds a model). Reference counting still frees
    every tensor and record as soon as it is dropped; the collector resumes afterwards."""
    if not gc.isenabled():  # paused already (a compare of several ranks, or the caller's choice)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _torch_threads_capped(workers: int | None) -> Iterator[None]:
    """torch's intra-op threads lowered, while two traces are compared, to the cores the compare's
    own threads (its workers and the checksum thread) leave free: one on a 2-core machine. The
    planning's small torch ops (index probes of the layouts, gathers) each opened a parallel region
    that waited for a core the hashing thread held: 15 ms of layout derivation took 30-130 ms, and
    the compare through layouts 0.49-0.51 s instead of 0.43-0.44 s (bench_trace's model). Only
    lowered, never raised; restored afterwards (the process default, and this thread's own)."""
    before = torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // ((workers or min(2, os.cpu_count() or 1)) + 1))
    if threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compare_traces(a: Any, b: Any, *, mapping: Any, tolerance: Tolerance | None, align: Method, margin: float,
                    rank: int | None, workers: int | None, inputs: Any, rank_a: int | None, rank_b: int | None,
                    each_rank: bool) -> TraceReport | RankedTraceReport:
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise UsageError(f"tolerance must be a tensorparity.Tolerance, not {type(tolerance).__name__}",
                         fix="pass tolerance=Tolerance(atol=..., rtol=...)")
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise UsageError(f"margin={margin!r} must be a number >= 1", fix="pass e.g. margin=10 (--margin 10)")
    tol = tolerance or Tolerance()
    key_mapping = None if mapping is None else load_mapping(mapping)
    if not isinstance(each_rank, bool):
        raise UsageError(f"each_rank must be True or False, not {each_rank!r}", fix="pass each_rank=True")
    plan = plan_ranks(a, b, rank=rank, rank_a=rank_a, rank_b=rank_b, each_rank=each_rank)
    if plan.pairs:  # several ranks: each pair compared on its own, one report of them all
        return compare_ranks(plan, lambda x, y: compare_traces(x, y, mapping=key_mapping, tolerance=tol, align=align,
                                                               margin=margin, workers=workers, inputs=inputs))
    a, b, rank_a, rank_b = plan.a, plan.b, plan.rank_a, plan.rank_b
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        if inputs is None:
            raise UsageError("two live models need an input to run on", fix="pass inputs=... (a tensor, a tuple of "
                                                                            "arguments or a dict of keywords)")
        a = run_like(a, None, inputs=inputs)
    if isinstance(a, nn.Module):
        src_b, side_b = _open(b, "B", rank_b)
        try:
            src_a, side_a = _open(run_like(a, src_b, inputs=inputs), "A", None)
        except BaseException:
            _close(b, src_b)
            raise
    else:
        src_a, side_a = _open(a, "A", rank_a)
        try:
            src_b, side_b = _open(run_like(b, src_a, inputs=inputs) if isinstance(b, nn.Module) else b, "B",
                                  None if isinstance(b, nn.Module) else rank_b)
        except BaseException:
            _close(a, src_a)
            raise
    try:
        # shard checksums hashed while the comparison is planned, torch's own ops kept off the cores the hashing
        # and comparing threads hold
        with check_ahead(src_a, src_b), _torch_threads_capped(workers):
            return _compare(src_a, src_b, side_a, side_b, key_mapping, tol, align, float(margin), workers)
    finally:  # traces this call opened release their shard files; tensors were compared and dropped
        _close(a, src_a)
        _close(b, src_b)


def _close(given: Any, source: Any) -> None:
    if isinstance(given, (str, os.PathLike)) and hasattr(source, "close"):
        source.close()


def _compare(src_a: RecordSource, src_b: RecordSource, side_a: TraceSide, side_b: TraceSide,
             key_mapping: Mapping | None, tol: Tolerance, align: Method, margin: float,
             workers: int | None) -> TraceReport:
    notes: list[str] = []
    found = None
    if key_mapping is None and align == "auto":
        found = find_mapping(src_a, src_b)
        notes += [found.note] if found.note else []
        key_mapping = found.mapping
    alignment = align_layers(src_a.records, src_b.records, mapping=key_mapping, method=align)
    notes += list(alignment.notes)
    through_mapping = key_mapping is not None and alignment.method == "mapping"
    if through_mapping:
        assert key_mapping is not None
        layers_a, layers_b = group_layers(src_a.records), group_layers(src_b.records)
        layouts = derive_layouts(key_mapping, param_shapes(src_a.records), param_shapes(src_b.records),
                                 layers_a, layers_b)
        notes += [f"{', '.join(x.a)}: {x.describe()}" for x in layouts if x.problem]
        alignment = apply_layouts(alignment, layouts, layers_a, layers_b, key_mapping.prefix_b)
    layers = [_Layer(m) for m in alignment.matches]
    jobs: list[Job] = []
    skipped: list[str] = []
    for i, layer in enumerate(layers):
        if layer.match.layout is not None:
            for slot, job in layout_jobs(src_a, src_b, i, layer.match, layer.notes):
                jobs.append(job)
                layer.slots[slot].append(job)
            continue
        for slot, kind in _SLOTS:
            if kind == "param_grad" and through_mapping:
                continue
            for ra, rb in pair_records(layer.match.a.of_kind(kind), layer.match.b.of_kind(kind)):
                job = make_job(src_a, src_b, slot, i, ra, rb, param=kind == "param_grad")
                if job is None:
                    skipped.append(ra.key)
                    continue
                jobs.append(job)
                layer.slots[slot].append(job)
    if skipped:
        notes.append(f"{len(skipped):,} record pair(s) could not be compared (a side kept neither the tensor nor "
                     f"its statistics), e.g. {skipped[0]}")
    if through_mapping:
        assert key_mapping is not None
        param_jobs, params_only_a, params_only_b = _params_through_mapping(src_a, src_b, key_mapping, layers, notes)
        jobs += param_jobs
    else:
        params_only_a, params_only_b = _params_without_partner(alignment)
        if params_only_a and params_only_b:
            notes.append("some parameter gradients have no partner of the same name: a mapping (--map) compares "
                         "renamed and fused parameters through its transforms")
    raised = assign_tolerances(jobs, layers, tol)
    plan_carries(jobs, layers, tol)
    run_jobs(jobs, tol, workers)
    for i, how in carried_layers(jobs).items():
        layers[i].carried = how
    sorted_values(jobs, layers, tol)
    warnings, more_notes, inputs_differ = provenance_checks(src_a, src_b, side_a, side_b, alignment)
    notes += more_notes
    results = classify(group_layers(src_a.records), layers, margin, inputs_differ)
    for i, origin in results.items():
        for job in layers[i].slots["forward"] + layers[i].slots["inputs"] + layers[i].slots["backward"]:
            direction = "backward" if job.slot == "backward" else "forward"
            if job.reordered is not None and direction in origin.healed_directions:
                layers[i].notes.append(f"{job.reordered.key}: the same values in another order (another "
                                       "layout); a mapping compares them in place")
                job.result = job.reordered
    comparisons = tuple(_layer_comparison(layer, results.get(i)) for i, layer in enumerate(layers))
    if any(j.stats for j in jobs):
        notes.append(f"{sum(j.stats for j in jobs):,} of {len(jobs):,} comparisons used statistics only (a side "
                     "stored no tensor): equal statistics do not prove equal tensors")
    if raised:
        notes.append("default tolerance: torch's per dtype, atol raised to 2·√n ulp of each tensor's largest "
                     "magnitude (n: the terms a value sums), so float32 summation order is not a mismatch")
    return TraceReport(
        a=side_a, b=side_b, tolerance=tol, alignment=alignment.method, layers=comparisons,
        only_a=tuple(_unaligned(u.layer, u.reason) for u in alignment.only_a),
        only_b=tuple(_unaligned(u.layer, u.reason) for u in alignment.only_b),
        params=tuple(j.result for j in jobs if j.param and j.result is not None),
        params_only_a=tuple(params_only_a), params_only_b=tuple(params_only_b),
        mapping=(None if not (through_mapping and key_mapping) else "found from the traces' parameters"
                 if found is not None and found.mapping is not None else str(key_mapping.source or key_mapping.name)),
        found_mapping=found.mapping if found is not None else None,
        margin=margin, inputs_differ=inputs_differ, warnings=tuple(warnings), notes=tuple(notes))


# --- sources, mapping ---------------------------------------------------------------------------

def _open(source: Any, name: str, rank: int | None) -> tuple[RecordSource, TraceSide]:
    if isinstance(source, (str, os.PathLike)):
        src: Any = Trace.open(source, rank=rank)
        label = str(src.path or source) if rank is not None else str(source)  # a rank: its rank-<r> folder
    elif isinstance(source, RecordSource):
        src = source
        label = str(getattr(source, "path", None) or f"<{type(source).__name__} in memory>")
    else:
        raise UsageError(f"trace {name} must be a Trace, a trace folder's path, or an object with records, "
                         f"provenance and load(record); got {type(source).__name__}",
                         fix="capture one with tensorparity.trace.capture, or pass a trace folder")
    records = list(src.records)
    prov = dict(src.provenance or {})
    mode = getattr(src, "mode", None) or prov.get("mode") or _mode(records)
    layers = len({(r.module, r.call) for r in records if r.kind not in ("param", "param_signature")})
    model = prov.get("model_class") or prov.get("model")
    return src, TraceSide(label, str(mode), len(records), layers, str(model) if model else None, prov)


def _mode(records: Sequence[TraceRecord]) -> str:
    stored = [r.stored for r in records if r.is_tensor]
    return "full" if all(stored) else ("stats" if not any(stored) else "window")


# --- pairing records ----------------------------------------------------------------------------

def _param_name(r: TraceRecord) -> str:
    return f"{r.module}.{r.path}" if r.module else r.path


def _params_without_partner(alignment: Alignment) -> tuple[list[str], list[str]]:
    def names(layers: Sequence[Any]) -> list[str]:
        return [_param_name(r) for u in layers for r in u.layer.of_kind("param_grad")]

    return names(alignment.only_a), names(alignment.only_b)


def _params_through_mapping(src_a: RecordSource, src_b: RecordSource, mapping: Mapping, layers: list[_Layer],
                            notes: list[str]) -> tuple[list[Job], list[str], list[str]]:
    """Parameter gradients of A renamed and transformed (concat, transpose, ...) into B's keys by the
    mapping itself, then compared with B's; each goes under its layer when both owners are paired."""
    recs_a = {_param_name(r): r for r in src_a.records if r.kind == "param_grad" and r.is_tensor}
    recs_b = {_param_name(r): r for r in src_b.records if r.kind == "param_grad" and r.is_tensor}
    owner = {(a.module, b.module): i for i, x in enumerate(layers)
             for a in (x.match.group_a or (x.match.a,)) for b in (x.match.group_b or (x.match.b,))}
    if not recs_a or not recs_b:  # a forward-only side: nothing to transform or compare
        return [], sorted(recs_a), sorted(recs_b)
    stored = all(r.stored for r in recs_a.values())
    located = open_checkpoint({k: _located(src_a, r) for k, r in recs_a.items()})
    try:
        mapped = apply_mapping(located, mapping)
    except MappingError as exc:
        notes.append(f"the mapping does not fit A's parameter gradients ({exc.problems[0]}); they were "
                     "paired by the module renames")
        return _params_by_renames(src_a, src_b, recs_a, recs_b, layers, owner)
    jobs, only_a, done = [], list(mapped.unmapped), set()
    reorders: dict[tuple[int, tuple[int, ...]], Any] = {}
    for target, entry in mapped.checkpoint.items():
        sources = [recs_a[s] for s in mapped.claims[target]]
        rb = recs_b.get(target)
        if rb is None:
            only_a += [s for s in mapped.claims[target] if s not in only_a]
            continue
        if not rb.stored and rb.stats is None:
            continue
        i = owner.get((sources[0].module, rb.module))
        if stored:
            # What A's side is after the transform: its statistics are measured, not taken from A's records.
            ra = replace(sources[0], shape=tuple(entry.shape), dtype=str(entry.dtype).removeprefix("torch."),
                         stats=None)
            job = Job("backward", i, " + ".join(r.key for r in sources), rb.key,
                      _in_place(mapped, target, entry, located, reorders), loadable(src_b, rb), ra, rb,
                      stats=not rb.stored, param=True)
        else:
            group = mapped.claims[target]
            if group in done:
                continue
            done.add(group)
            job = _param_stats_job(i, mapping, mapped, group, sources, recs_b, notes)
            if job is None:
                continue
        jobs.append(job)
        if i is not None:
            layers[i].slots["backward"].append(job)
    only_b = [k for k in recs_b if k not in mapped.claims and not mapping.ignored(k, side="b")]
    return jobs, only_a, only_b


def _in_place(mapped: Any, target: str, entry: Any, located: Any,
              reorders: dict[tuple[int, tuple[int, ...]], Any]) -> Any:
    """A's side of a mapped parameter gradient: where the rule only reorders one tensor's slices
    along an axis (interleaved rows, permuted heads), its source read in place through that
    reordering (a gather the kernel reads without copying); else the transformed entry."""
    rule = mapped.rule_of.get(target)
    claims = mapped.claims[target]
    if rule is None or len(claims) != 1:
        return entry
    source = located[claims[0]]
    transform = mapped.mapping.rules[rule].transform
    if transform is None or tuple(source.shape) != tuple(entry.shape) or source.dtype_name != entry.dtype_name:
        return entry
    key = (rule, tuple(source.shape))
    if key not in reorders:
        reorders[key] = reorder_of(transform, tuple(source.shape))
    found = reorders[key]
    if found is None:
        return entry
    axis, index = found
    return source if index is None else Gathered((source,), axis, index)


def _located(source: RecordSource, record: TraceRecord) -> LazyTensor:
    """A record's tensor for the mapping: where its bytes lie in the trace, when it says (a
    renamed parameter gradient is then compared from the shards' bytes), else loaded on demand."""
    lazy = getattr(source, "lazy", None)
    if callable(lazy) and record.stored:
        t = lazy(record)
        if isinstance(t, LazyTensor):
            return t
    return LazyTensor(record.shape, getattr(torch, record.dtype), 0, record.key, RecordTensor(source, record).load)


_MOVES = frozenset({"rearrange", "permute", "transpose", "reshape", "concat", "split", "cast", "chain"})


def _moves_data(transform: Any) -> bool:
    """Whether a transform only moves (or casts) elements, so statistics of the whole survive it."""
    if transform is None:
        return True
    return transform.name in _MOVES and all(_moves_data(s) for s in getattr(transform, "steps", ()))


def _param_stats_job(owner: int | None, mapping: Mapping, mapped: Any, group: tuple[str, ...],
                     sources: list[TraceRecord], recs_b: dict[str, TraceRecord], notes: list[str]) -> Job | None:
    """Parameter gradients kept as statistics: the statistics of a rule's sources together against
    those of its targets together (exact for a rule that only moves elements)."""
    targets = [t for t, c in mapped.claims.items() if c == group and t in recs_b]
    rule = mapped.rule_of.get(targets[0])
    if rule is not None and not _moves_data(mapping.rules[rule].transform):
        notes.append(f"rules[{rule}] changes values ({mapping.rules[rule].transform.describe()}): the parameter "
                     f"gradients of {', '.join(group)} kept as statistics cannot be compared through it")
        return None
    stats_a = combine_stats([r.stats for r in sources]) if len(sources) > 1 else sources[0].stats
    parts_b = [recs_b[t] for t in targets]
    stats_b = combine_stats([r.stats for r in parts_b]) if len(parts_b) > 1 else parts_b[0].stats
    if stats_a is None or stats_b is None:
        return None
    numel_a, numel_b = sum(math.prod(r.shape) for r in sources), sum(math.prod(r.shape) for r in parts_b)
    ra = replace(sources[0], shape=(numel_a,), stats=stats_a, stored=False)
    rb = replace(parts_b[0], shape=(numel_b,), stats=stats_b, stored=False)
    return Job("backward", owner, " + ".join(r.key for r in sources), " + ".join(r.key for r in parts_b),
               RecordTensor(None, ra), RecordTensor(None, rb), ra, rb, stats=True, param=True)  # type: ignore[arg-type]


def _params_by_renames(src_a: RecordSource, src_b: RecordSource, recs_a: dict[str, TraceRecord],
                       recs_b: dict[str, TraceRecord], layers: list[_Layer],
                       owner: dict[tuple[str, str], int]) -> tuple[list[Job], list[str], list[str]]:
    jobs, taken = [], set()
    for x in layers:
        for ra, rb in pair_records(x.match.a.of_kind("param_grad"), x.match.b.of_kind("param_grad")):
            i = owner[(x.match.a.module, x.match.b.module)]
            job = make_job(src_a, src_b, "backward", i, ra, rb, param=True)
            if job is None:
                continue
            jobs.append(job)
            layers[i].slots["backward"].append(job)
            taken |= {("a", _param_name(ra)), ("b", _param_name(rb))}
    return (jobs, [k for k in recs_a if ("a", k) not in taken], [k for k in recs_b if ("b", k) not in taken])


# --- assembly ------------------------------------------------------------------------

def _unaligned(layer: TraceLayer, reason: str) -> UnalignedLayer:
    return UnalignedLayer(layer.name, layer.module_type, layer.shape, reason)


def _layer_comparison(layer: _Layer, origin: Any) -> LayerComparison:
    m = layer.match
    slots = {k: tuple(j.result for j in v if j.result is not None) for k, v in layer.slots.items()}
    bases = {j.stats for v in layer.slots.values() for j in v}
    basis = "mixed" if len(bases) > 1 else ("stats" if bases == {True} else "tensors")
    kw = origin.as_fields() if origin is not None else {}
    return LayerComparison(layer_a=m.name_a, layer_b=m.name_b, type_a=m.a.module_type, type_b=m.b.module_type,
                           how=m.how, order=m.a.order, backward_order=m.a.backward_order,
                           shape=layer.slots["forward"][0].ra.shape if m.layout and layer.slots["forward"] else m.a.shape,
                           forward=slots["forward"], inputs=slots["inputs"], backward=slots["backward"],
                           basis=basis, by_stats=tuple(j.key for v in layer.slots.values() for j in v if j.stats),
                           layout=m.layout.describe() if m.layout is not None else layer.carried,
                           layout_notes=tuple(layer.notes), **kw)
