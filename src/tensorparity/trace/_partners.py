"""Replay's two adaptations to another implementation: which of its modules is each reference
layer's partner, and how to call a module whose ``forward`` takes other arguments.

**Partners.** Names alone (the same path, or the renames a parameter-key mapping implies) cannot
pair a parameter-free module (an activation, an attention wrapper around fused projections): the
model is run once on the reference's own model input, recorded as statistics only, and that probe
trace is aligned with the reference exactly as :func:`~tensorparity.trace.compare_traces` aligns
two traces (mapping, names, then execution order inside paired parents).

**Calls.** Implementations differ in signatures: Hugging Face's decoder layer takes
``attention_mask``, ``position_embeddings`` and more as keywords, a port's block takes ``x``. The
recorded call is tried as it is; then with only the keywords the module's ``forward`` accepts;
then with the first recorded tensor alone. Which of these ran is reported with the layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.reader import Trace, rebuild_call
from tensorparity.mapping import Mapping, suggest_mapping
from tensorparity.trace._capture import capture
from tensorparity.trace._found import extend_by_names, stored_parameters
from tensorparity.trace._layout import Layout, derive_layouts, param_shapes
from tensorparity.trace._layout_align import apply_layouts
from tensorparity.trace.align import align_layers, group_layers

__all__ = ["call_adapted", "model_layouts", "model_mapping", "partners", "probe"]


def probe(trace: Trace, model: nn.Module, device: torch.device) -> Trace | None:
    """The model run once on the reference's own model input, recorded as statistics only (what
    pairs its modules with the reference's); ``None`` when the reference holds no model input to
    probe with, or the probe raises (replay then pairs by names alone)."""
    rows = [r for r in trace.records if r.kind == "model_input" and r.call == 0]
    if not rows or any(r.is_tensor and not r.stored for r in rows):
        return None
    args, kwargs = rebuild_call(rows, lambda r: trace.load(r).to(device))
    try:
        with capture(model, mode="stats", grads=False, param_grads=False, params=False) as found, torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the user's model: replay still pairs by names
        return None
    return found


def partners(trace: Trace, probed: Trace | None, mapping: Mapping | None,
             layouts: Sequence[Layout] = ()) -> dict[str, tuple[str, str]]:
    """Reference layer name -> (the model's module path, how it was paired), from a probe run
    aligned as compare aligns two traces (layouts included: a group's modules are replayed
    together, and what a group's modules were paired with before is released)."""
    if probed is None:
        return {}
    method = "mapping" if mapping is not None else "auto"
    alignment = align_layers(trace.records, probed.records, mapping=mapping, method=method)  # type: ignore[arg-type]
    if layouts:
        alignment = apply_layouts(alignment, layouts, group_layers(trace.records), group_layers(probed.records),
                                  mapping.prefix_b if mapping is not None else "")
    return {m.a.name: (m.b.module, m.how) for m in alignment.matches if m.b.call == 0 and not m.group_a}


def model_layouts(trace: Trace, model: nn.Module, probed: Trace | None, mapping: Mapping) -> list[Layout]:
    """The activation layouts the mapping implies between the reference and the model."""
    owners = dict(model.named_modules())
    params_b = {}
    for name, p in model.named_parameters():
        owner = owners.get(name.rpartition(".")[0], model)
        params_b[name] = (tuple(p.shape), f"{type(owner).__module__}.{type(owner).__qualname__}")
    layers_b = group_layers(probed.records) if probed is not None else []
    return derive_layouts(mapping, param_shapes(trace.records), params_b, group_layers(trace.records), layers_b)


def model_mapping(trace: Trace, model: nn.Module) -> tuple[Mapping | None, str]:
    """The mapping from the reference's recorded parameters to the model's, found by content when
    the names or the layouts differ (see :mod:`._found`); ``(None, why)`` where none is needed or
    the trace recorded no parameters."""
    recorded, kind = stored_parameters(trace.records)
    params = {k: p.detach() for k, p in model.named_parameters()}
    if kind != "param" or not params:
        return None, ("no mapping was given and the reference stores no parameters to find one from (capture it "
                      "in full mode, or pass --map)") if kind != "param" else ""
    if recorded.keys() == params.keys() and all(
            tuple(recorded[k].shape) == tuple(params[k].shape) and torch.equal(trace.load(recorded[k]).to(params[k].device),
                                                                             params[k]) for k in params):
        return None, ""
    suggestion = suggest_mapping({k: trace.load(r) for k, r in recorded.items()},
                                 {k: p.cpu() for k, p in params.items()}, progress=False)
    if not any(p.transform is not None or p.a_keys != p.b_keys for p in suggestion.pairs):
        return None, ""
    shapes_a = {k: (tuple(r.shape), r.dtype) for k, r in recorded.items()}
    shapes_b = {k: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for k, p in params.items()}
    return extend_by_names(suggestion, shapes_a, shapes_b), (
        f"no mapping was given: found one from the reference's parameters and the model's ({suggestion.summary()})")


def _accepted(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The keywords ``forward`` accepts (``None`` when it takes ``**kwargs``: all of them)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def _required(module: nn.Module) -> list[str]:
    """The names of ``forward``'s positional arguments (torchtune's attention: ``x, y``)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def call_adapted(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str | None]:
    """Call ``module`` on a recorded call, adapting it to the module's signature where needed.

    Returns the result and how the call was adapted (``None`` when called as recorded). The last
    attempt's exception propagates.

    Example:
        >>> import torch
        >>> out, how = call_adapted(torch.nn.ReLU(), (), {"hidden_states": -torch.ones(2), "mask": None})
        >>> out.tolist(), how
        ([0.0, 0.0], 'called with the first recorded tensor only (forward takes none of: hidden_states, mask)')
    """
    try:
        return module(*args, **kwargs), None
    except TypeError as first:
        kept = _accepted(module, kwargs)
        if kept is not None and len(kept) < len(kwargs):
            dropped = ", ".join(k for k in kwargs if k not in kept)
            try:
                return module(*args, **kept), f"called without the keywords forward does not take: {dropped}"
            except TypeError:
                pass
        tensor = _first_tensor(args, kwargs)
        if tensor is None or (len(args) == 1 and not kwargs):
            raise first from None
        try:
            return module(tensor), ("called with the first recorded tensor only (forward takes none of: "
                                    f"{', '.join(kwargs)})" if not args else "called with the first recorded tensor only")
        except (TypeError, ValueError) as second:
            required = _required(module)
            if len(required) < 2:
                raise second from None
            # Self-attention written as forward(x, y): the recorded hidden states for each.
            return module(*[tensor] * len(required)), (f"called with the first recorded tensor for each of "
                                                       f"{', '.join(required)}")
