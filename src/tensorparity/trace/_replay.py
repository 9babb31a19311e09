"""Replay: feed each module of a model the inputs recorded for its partner in a reference trace,
and compare what it returns with the partner's recorded output.

Comparing two full runs shows where outputs diverge, but a layer downstream of a bug sees wrong
inputs and differs too. Replaying calls every module *alone* on the reference's own inputs, so
each comparison measures that layer's own error, free of anything upstream, and it works across
environments: the reference trace is captured where the reference lives (``capture(...,
inputs=True)``), the other implementation is replayed where it lives.

Modules are paired with the reference's as :mod:`tensorparity.trace.align` pairs two traces: the
model is probed once on the reference's model input and aligned by the same path, through the
module renames a parameter-key mapping implies, or by execution order (see :mod:`._partners`, which
also adapts a recorded call to a ``forward`` with another signature). A mismatched module
whose descendants also mismatch *contains* them: its error is explained by them (and it may or may
not add its own); a mismatched module without mismatched descendants is a culprit.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace, rebuild_call
from tensorparity.checkpoint.tracefolder.records import TraceRecord, flatten_value
from tensorparity.errors import UsageError
from tensorparity.mapping import Mapping, load_mapping
from tensorparity.numerics import Pair, Tolerance, compare_pairs
from tensorparity.trace._jobs import Given, RecordTensor, float_tolerance, is_default, overridden, summands
from tensorparity.trace._layout import Gathered, Layout, feature_axis
from tensorparity.trace._partners import call_adapted, model_layouts, model_mapping, partners, probe
from tensorparity.trace._replay_layout import as_recorded, differing_parts, reorder_first
from tensorparity.trace._replay_layout import reordered as values_reordered
from tensorparity.trace._replay_report import SCHEMA, ReplayedLayer, ReplayReport, SkippedLayer
from tensorparity.trace.align import TraceLayer, group_layers, module_renames
from tensorparity.trace.noise import FACTOR, double_copy, noise_atol, noise_tolerance, to_double

__all__ = ["SCHEMA", "ReplayReport", "ReplayedLayer", "SkippedLayer", "replay"]

# Non-tensor arguments the manifest keeps as themselves (JSON values); anything else (a KV cache,
# a config object) is kept as its repr and cannot be passed again.
_REBUILT = frozenset({"NoneType", "bool", "int", "float", "str"})


def _rebuild(rows: list[TraceRecord], trace: Trace, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded call's ``(args, kwargs)``, its tensors moved to ``device``."""
    return rebuild_call(rows, lambda r: trace.load(r).to(device))


def _pair(recorded: tuple[TraceRecord, ...], got: dict[str, torch.Tensor]) -> tuple[list[tuple[TraceRecord, str]],
                                                                                     list[str]]:
    """Recorded outputs and returned ones by path; a lone pair matches whatever its path, and so
    does a lone returned output with the first recorded one when no path is shared (an attention
    recorded as ``(output, weights)``, replayed on one returning the output)."""
    if len(recorded) == 1 and len(got) == 1:
        return [(recorded[0], next(iter(got)))], []
    pairs = [(r, r.path) for r in recorded if r.path in got]
    if not pairs and recorded and len(got) == 1:
        return [(recorded[0], next(iter(got)))], []
    missing = [r.path for r in recorded if r.path not in got]
    return pairs, missing


def _open(reference: Trace | str | os.PathLike[str]) -> Trace:
    if isinstance(reference, Trace):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        return Trace.open(reference)
    raise UsageError(f"reference must be a Trace or a trace folder's path, not {type(reference).__name__}",
                     fix="capture it with tensorparity.trace.capture(model, inputs=True)")


def replay(
    reference: Trace | str | os.PathLike[str],
    model: nn.Module,
    *,
    mapping: Mapping | str | os.PathLike[str] | dict[str, Any] | None = None,
    tolerance: Tolerance | None = None,
    noise_floor: bool = False,
    factor: float = FACTOR,
) -> ReplayReport:
    """Call each module of ``model`` alone on the inputs recorded for its reference partner.

    Args:
        reference: the reference trace (or its folder), captured with ``inputs=True``.
        model: the implementation to check; run under ``torch.no_grad()`` on its own device, in the
            train/eval mode the reference was captured in (restored afterwards).
        mapping: the reference's parameter keys -> the model's; modules are renamed through it.
        tolerance: keys are the reference's record keys (``module/call/output[/path]``), so a
            :func:`~tensorparity.trace.noise.noise_floor` of the reference applies as it is. By
            default torch's per dtype, with atol raised to float32 summation noise at each
            tensor's scale (see :mod:`tensorparity.trace._jobs`).
        noise_floor: also replay each module in float64 (a deep copy of the model, inputs cast)
            and judge its outputs with ``factor`` times its own measured float32 error.
        factor: the noise floor's multiple (see :mod:`tensorparity.trace.noise`).

    Raises:
        TraceError: the reference holds no module inputs (captured without ``inputs=True``).

    Example:
        >>> import torch, tensorparity.trace as tt
        >>> ref = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with tt.capture(ref, inputs=True) as trace:
        ...     _ = ref(torch.ones(1, 2))
        >>> other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> other.load_state_dict(ref.state_dict()); other[1] = torch.nn.Tanh()
        <All keys matched successfully>
        >>> [x.layer for x in replay(trace, other).culprits]
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"replay needs the model as an nn.Module, not {type(model).__name__}",
                         fix="pass the model itself (on the command line: the MODEL argument, pkg.module:factory)")
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise UsageError(f"tolerance must be a tensorparity.Tolerance, not {type(tolerance).__name__}",
                         fix="pass tolerance=Tolerance(atol=...) or noise_floor(reference_model, inputs)")
    trace = _open(reference)
    if not any(r.kind == "input" for r in trace.records):
        raise TraceError("the reference trace holds no module inputs, so there is nothing to replay",
                         path=trace.path, fix="capture the reference again with inputs=True "
                                              "(tensorparity capture ... --inputs)")
    key_mapping = load_mapping(mapping) if mapping is not None else None
    tol = tolerance or Tolerance()
    params = list(model.parameters()) or list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    # Aliases too: a module shared by several parents is recorded under the name of the parent
    # that called it (see the capture), which may be any of its paths.
    modules = dict(model.named_modules(remove_duplicate=False))
    double = dict(_double(model).named_modules(remove_duplicate=False)) if noise_floor else {}
    training = trace.provenance.get("training")
    modes = {m: m.training for m in model.modules()}
    layers: list[ReplayedLayer] = []
    skipped: list[SkippedLayer] = []
    switched = False
    try:
        if training is not None and model.training != bool(training):
            # Only the whole model's mode is matched to the reference's: a sub-module the user
            # left in another mode (a dropout left on) is part of what is being checked.
            model.train(bool(training))
            switched = True
        probed = probe(trace, model, device)
        notes: list[str] = []
        found_mapping = None
        if key_mapping is None:
            key_mapping, why = model_mapping(trace, model)
            notes += [why] if why else []
            found_mapping = key_mapping
        renames = None
        layouts: list[Layout] = []
        if key_mapping is not None:
            renames = module_renames(key_mapping, param_names={r.path for r in trace.records
                                                               if r.kind in ("param", "param_grad")})
            layouts = model_layouts(trace, model, probed, key_mapping)
            notes += [f"{', '.join(x.a)}: {x.describe()}" for x in layouts if x.problem]
        found = partners(trace, probed, key_mapping, layouts)
        call_sites = dict((probed.provenance.get("call_sites") or {}) if probed is not None else {})
        grouped = {m: x for x in layouts if x.problem is None for m in x.a}
        all_layers = group_layers(trace.records)
        by_key = {(x.module, x.call): x for x in all_layers}
        with torch.no_grad():
            for layer in all_layers:
                lay = grouped.get(layer.module) if layer.module else None
                if lay is not None and layer.module != lay.a[0]:
                    continue  # replayed with the first module of its group
                if lay is not None:
                    group = tuple(by_key.get((m, layer.call)) for m in lay.a)
                    done = _replay_layout(trace, group, lay, modules, key_mapping, tol, device)  # type: ignore[arg-type]
                else:
                    done = _replay_layer(trace, layer, modules, double, renames, key_mapping, tol, device, factor,
                                         found, call_sites)
                (layers if isinstance(done, ReplayedLayer) else skipped).append(done)
    finally:
        for m, mode in modes.items():
            m.training = mode
    layers = _explain(layers)
    if training is None:
        notes.append("the trace does not say whether the reference ran in training mode; the model's own mode "
                     "was used")
    if switched:
        notes.append(f"the model was switched to {'training' if training else 'eval'} mode, as the reference ran")
    if training:
        notes.append("the reference ran in training mode: dropout draws masks anew, so replayed layers with "
                     "dropout differ; capture and replay in eval mode")
    if renames is not None:
        notes += list(renames.notes)
    return ReplayReport(str(trace.path or "<in-memory trace>"), f"{type(model).__module__}.{type(model).__qualname__}",
                        tol, tuple(layers), tuple(skipped), tuple(notes), found_mapping)


def _double(model: nn.Module) -> nn.Module:
    return double_copy(model)


def _replay_layer(trace: Trace, layer: TraceLayer, modules: dict[str, nn.Module], double: dict[str, nn.Module],
                  renames: Any, key_mapping: Mapping | None, tol: Tolerance, device: torch.device,
                  factor: float, found: dict[str, tuple[str, str]],
                  probed_paths: dict[str, str] | None = None) -> ReplayedLayer | SkippedLayer:
    outputs = layer.of_kind("output", "model_output")
    if not outputs:
        return SkippedLayer(layer.name, "no tensor output recorded")
    target, why = (layer.module, "same name")
    if layer.name in found and layer.module:
        target, why = found[layer.name][0], "the probe's alignment"
    elif layer.module and renames is not None:
        target, why = renames.map(layer.module)
        if target is None:
            return SkippedLayer(layer.name, f"no partner module: {why}")
    names = [target] + ([key_mapping.prefix_b + target] if key_mapping is not None and key_mapping.prefix_b else [])
    if probed_paths:  # a call-site name the probe recorded for a module registered elsewhere
        names += [probed_paths[n] for n in names if n in probed_paths]
    name = next((n for n in names if n in modules), None)
    if name is None:
        return SkippedLayer(layer.name, f"the model has no module {target!r}"
                            + (f" (name from {why})" if why != "same name" else ""))
    kinds = ("input",) if layer.module else ("model_input",)
    rows = [r for r in layer.records if r.kind in kinds]
    if not rows and layer.module:
        return SkippedLayer(layer.name, "its inputs were not recorded")
    if any(r.is_tensor and not r.stored for r in rows) or not all(r.stored for r in outputs):
        return SkippedLayer(layer.name, f"its inputs or outputs were kept as statistics only (mode {trace.mode})")
    module = modules[name]
    mtype = f"{type(module).__module__}.{type(module).__qualname__}"
    opaque = [r for r in rows if not r.is_tensor and r.dtype not in _REBUILT]
    args, kwargs = _rebuild([replace(r, value=None) if r in opaque else r for r in rows], trace, device)
    passed_none = (", ".join(f"{r.path} (a {r.dtype})" for r in opaque) + " recorded as text, passed as None"
                   if opaque else None)
    try:
        result, adapted = call_adapted(module, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's module: its failure is this layer's verdict
        if opaque:  # not the module's fault: what it was called with could not be rebuilt
            return SkippedLayer(layer.name, f"{passed_none}, and then it raised {type(exc).__name__}: "
                                            f"{' '.join(str(exc).split())[:120]}")
        return ReplayedLayer(layer.name, name, mtype, layer.order, error=f"{type(exc).__name__}: {exc}"[:300])
    if opaque:
        adapted = f"{adapted}; {passed_none}" if adapted else passed_none
    got = {p: t.detach() for p, t in flatten_value(result) if isinstance(t, torch.Tensor)}
    pairs, missing = _pair(outputs, got)
    if missing:
        return ReplayedLayer(layer.name, name, mtype, layer.order,
                             error=f"returned no output at path(s) {', '.join(missing)} (it returned "
                                   f"{', '.join(got) or 'no tensor'})")
    layer_tol = tol
    if double:
        got64 = {p: t for p, t in flatten_value(call_adapted(double[name], to_double(args), to_double(kwargs))[0])
                 if isinstance(t, torch.Tensor)}
        atols = {r.key: noise_atol(got[p], got64[p], factor=factor) for r, p in pairs
                 if p in got64 and got[p].is_floating_point() and got64[p].shape == got[p].shape}
        layer_tol = noise_tolerance(atols, base=tol)
    pair_tol = float_tolerance(tol, summands(layer, "output")) if not double and is_default(tol) else None
    jobs = [Pair(r.key, RecordTensor(trace, r), Given(as_recorded(got[p].cpu(), r)),
                 key_b=f"{name}/{p}" if p else name, tolerance=None if overridden(tol, r.key) else pair_tol)
            for r, p in pairs]
    results = tuple(compare_pairs(jobs, layer_tol, workers=1))
    reordered = values_reordered(jobs, results, feature_axis(mtype), layer_tol)
    if opaque and not reordered and not all(t.passed for t in results):
        # None stood in for an object the trace could not keep (a cache holding earlier steps'
        # keys): a difference may be that substitution's, so it is no verdict on the module.
        return SkippedLayer(layer.name, f"{passed_none}; its outputs then differ, which may be the substitution's "
                                        "doing: not judged")
    return ReplayedLayer(layer.name, name, mtype, layer.order, results, adapted=adapted, reordered=reordered)


def _replay_layout(trace: Trace, group: tuple[TraceLayer | None, ...], layout: Layout, modules: dict[str, nn.Module],
                   key_mapping: Mapping | None, tol: Tolerance, device: torch.device) -> ReplayedLayer | SkippedLayer:
    """A group of reference layers replayed on the model's modules through a layout: the model's
    module(s) called on the reference's input (its features reordered where the layout says), what
    they return joined on their feature axis, and compared with the reference's outputs joined and
    reordered into the model's layout."""
    name_a = " + ".join(x.name for x in group if x is not None)
    first = group[0]
    if first is None or any(x is None for x in group):
        return SkippedLayer(name_a or layout.a[0], "a module of its group did not run in the reference")
    prefix = key_mapping.prefix_b if key_mapping is not None else ""
    names = [next((n for n in (m, prefix + m) if n in modules), None) for m in layout.b]
    if any(n is None for n in names):
        return SkippedLayer(name_a, f"the model has no module {', '.join(layout.b)} (from {layout.describe()})")
    rows = [r for r in first.records if r.kind == "input"]
    outs = [x.of_kind("output") for x in group]
    if not rows:
        return SkippedLayer(name_a, "its inputs were not recorded")
    if any(r.is_tensor and not r.stored for r in rows) or not all(o and all(r.stored for r in o) for o in outs):
        return SkippedLayer(name_a, f"its inputs or outputs were kept as statistics only (mode {trace.mode})")
    args, kwargs = _rebuild(rows, trace, device)
    if layout.in_index is not None:
        args, kwargs = reorder_first(args, kwargs, layout.in_index, layout.axis_a)
    label = " + ".join(n for n in names if n)
    mtypes = {f"{type(modules[n]).__module__}.{type(modules[n]).__qualname__}" for n in names if n}
    mtype = " + ".join(sorted(mtypes))
    got, adapted = [], None
    for n in names:
        try:
            result, how = call_adapted(modules[n], args, kwargs)  # type: ignore[index]
        except Exception as exc:  # noqa: BLE001 - the user's module: its failure is this layer's verdict
            return ReplayedLayer(name_a, label, mtype, first.order, error=f"{type(exc).__name__}: {exc}"[:300],
                                 layout=layout.describe())
        adapted = adapted or how
        tensor = next((t for _, t in flatten_value(result) if isinstance(t, torch.Tensor)), None)
        if tensor is None:
            return ReplayedLayer(name_a, label, mtype, first.order, error=f"{n} returned no tensor",
                                 layout=layout.describe())
        got.append(tensor.detach().cpu())
    want = Gathered(tuple(RecordTensor(trace, o[0]) for o in outs), layout.axis_a, layout.out_index)
    try:
        mine = torch.cat(got, dim=layout.axis_b) if len(got) > 1 else got[0]
    except RuntimeError as exc:
        return ReplayedLayer(name_a, label, mtype, first.order, layout=layout.describe(),
                             error=f"its outputs do not join on axis {layout.axis_b} ({exc})"[:300])
    pair_tol = (float_tolerance(tol, summands(first, "output"))
                if is_default(tol) and not overridden(tol, outs[0][0].key) else None)
    pair = Pair(outs[0][0].key, want, Given(mine), key_b=label, tolerance=pair_tol)
    results = tuple(compare_pairs([pair], tol, workers=1))
    reordered = values_reordered([pair], results, layout.axis_b, tol)
    if not results[0].passed and not reordered and results[0].status != "shape":
        # Name the parts that differ: v of a fused qkv, not the whole group.
        sizes_a = [o[0].shape[layout.axis_a] for o in outs]
        names_a = [x.name for x in group if x is not None]
        bad_a, bad_b = differing_parts(want.load(), mine, results[0], layout, sizes_a, [g.shape[layout.axis_b] for g in got])
        name_a = " + ".join(names_a[i] for i in bad_a) if len(names_a) > 1 and bad_a else name_a
        label = " + ".join(names[i] for i in bad_b) if len(names) > 1 and bad_b else label  # type: ignore[misc]
    return ReplayedLayer(name_a, label, mtype, first.order, results, adapted=adapted, layout=layout.describe(),
                         reordered=reordered)


def _explain(layers: list[ReplayedLayer]) -> list[ReplayedLayer]:
    """Mark every mismatched layer with the mismatched layers inside it (by reference module path)."""
    bad = [x for x in layers if not x.passed]
    out = []
    for x in layers:
        if x.passed:
            out.append(x)
            continue
        module = x.layer.split("#")[0]
        prefix = "" if module == "<model>" else module + "."
        inner = tuple(y.layer for y in bad if y is not x and y.layer != "<model>" and y.layer.startswith(prefix))
        out.append(ReplayedLayer(x.layer, x.module, x.module_type, x.order, x.outputs, inner, x.error, x.adapted,
                                 x.layout, x.reordered))
    return out
