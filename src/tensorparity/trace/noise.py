"""Tolerances from measured numerical noise: run the reference in float32 and in float64 on the
same input and allow each layer a multiple of the error float32 itself makes.

Why a multiple, and which: ``torch._dynamo.utils.same`` judges a result against a float64
reference and passes it when the result's error is at most ``multiplier`` (2.0) times the error
the float32 reference itself makes. Here the two things compared are both float32 runs (the
reference's and the other implementation's), and per element ``|b - a| <= |b - a64| + |a64 - a|``.
If B may be ``2`` times as far from float64 as A is (dynamo's multiplier) and A is ``noise`` away,
the difference seen is at most ``2·noise + noise``: :data:`FACTOR` = 3.

A layer whose float32 and float64 results agree exactly (a ReLU of representable numbers, a
copy, integer outputs) would get atol 0, and any reordering of a sum in the other
implementation would fail it; so every tolerance is at least :data:`ULPS` units in the last
place of float32 at the tensor's largest magnitude (and never 0).
"""

from __future__ import annotations

import re
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.format import rank_folders
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import TraceRecord
from tensorparity.errors import UsageError
from tensorparity.numerics import Tolerance
from tensorparity.trace._capture import capture
from tensorparity.trace.seed import seed_everything

__all__ = ["FACTOR", "ULPS", "double_copy", "noise_atol", "noise_atols", "noise_floor", "noise_tolerance",
           "recorded_noise_floor", "to_double"]

FACTOR = 3.0  # 1 (A's own float32 error) + 2 (dynamo's multiplier for B's): see the module docstring
ULPS = 4.0  # the floor: float32 units in the last place at the tensor's largest magnitude
_EPS32 = torch.finfo(torch.float32).eps
_TINY = torch.finfo(torch.float32).tiny


def noise_atol(t32: torch.Tensor, t64: torch.Tensor, *, factor: float = FACTOR, ulps: float = ULPS) -> float:
    """The atol a tensor gets from its float32 and float64 results: ``factor`` times their largest
    absolute difference, at least ``ulps`` float32 ulps at the largest magnitude (never 0).

    Example:
        >>> x64 = torch.tensor([1.0, 2.0], dtype=torch.float64) / 3
        >>> atol = noise_atol(x64.float(), x64)
        >>> 0 < atol < 1e-6
        True
    """
    a, b = t32.detach().to("cpu", torch.float64), t64.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    err = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
    scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
    return max(factor * err, ulps * _EPS32 * scale, _TINY)


def to_double(value: Any) -> Any:
    """``value`` with every floating-point tensor (also inside lists, tuples, dicts) as float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_double(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_double(v) for v in value)
    return value


def double_copy(model: nn.Module, *, rebuild: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A float64 second instance of ``model``, made without ``copy.deepcopy``; ``model`` is left
    exactly as it was (parameters, dtype, gradients, hooks).

    Every module is copied shallowly: its attributes that are not parameters, buffers or
    sub-modules (configs, tokenizers, the ``wrapt`` proxies every NeMo model holds, which refuse
    to be deep-copied) are shared with the original, not copied. Parameters and buffers are fresh
    clones (floating ones float64, parameters without gradients), sub-modules are copied the same
    way, and whatever the original shares (tied weights, a module used twice) the copy shares
    too. The copy carries none of the original's hooks (a capture's among them), then gets
    ``.double()`` so that modules overriding it (Lightning's dtype) see it.

    Args:
        model: the float32 model; it is not changed.
        rebuild: instead of copying, build a fresh instance (``rebuild()``) and load ``model``'s
            state dict into it.

    Example:
        >>> ref = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> twin = double_copy(ref)
        >>> twin[0].weight.dtype, ref[0].weight.dtype, torch.equal(twin[0].weight, ref[0].weight.double())
        (torch.float64, torch.float32, True)
    """
    if rebuild is not None:
        fresh = rebuild()
        fresh.load_state_dict(model.state_dict())
        return fresh.train(model.training).double()
    return _copy_module(model, {}).double()


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # memo: id of an original module, parameter or buffer -> its copy (what is shared stays shared).
    if id(module) in memo:
        return memo[id(module)]
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    state = dict(module.__dict__)  # not __getstate__/__reduce__: those may drop or refuse attributes
    for name, value in state.items():
        if name.startswith("_") and "hook" in name and isinstance(value, dict):
            state[name] = OrderedDict()  # forward, backward and state-dict hooks: the original's, not the copy's
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            state[name] = types.MethodType(value.__func__, new)  # a method bound as an attribute (a patched forward)
    state["_is_full_backward_hook"] = None
    state.pop("_compiled_call_impl", None)  # module.compile()'s wrapper calls the original
    state["_parameters"] = {k: _copy_tensor(p, memo) for k, p in module._parameters.items()}
    state["_buffers"] = {k: _copy_tensor(b, memo) for k, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: None if m is None else _copy_module(m, memo) for k, m in module._modules.items()}
    new.__dict__.update(state)
    return new


def _copy_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> Any:
    if t is None:
        return None
    if id(t) not in memo:
        data = t.detach().to(torch.float64 if t.is_floating_point() else t.dtype, copy=True)
        if isinstance(t, nn.Parameter):
            copied = nn.Parameter(data, requires_grad=t.requires_grad)
            # attributes libraries tag parameters with (Megatron's), not tensor hooks
            copied.__dict__.update({k: v for k, v in t.__dict__.items() if "hook" not in k})
        else:
            copied = data
        memo[id(t)] = copied
    return memo[id(t)]


def noise_tolerance(atols: dict[str, float], *, base: Tolerance | None = None) -> Tolerance:
    """A :class:`Tolerance` with one exact-key override per record key: ``atol`` as given, rtol 0.

    Keys are record keys (``module/call/kind[/path]``), escaped so that a module's name is never
    read as a regular expression; keys not listed keep ``base`` (default: torch's per dtype).

    Example:
        >>> tol = noise_tolerance({"fc/0/output": 2e-6})
        >>> tol.for_key("fc/0/output", torch.float32).atol, tol.for_key("fc2/0/output", torch.float32).atol
        (2e-06, 1e-05)
    """
    base = base or Tolerance()
    overrides = tuple((f"^{re.escape(key)}$", Tolerance(atol=atol, rtol=0.0)) for key, atol in atols.items())
    return Tolerance(atol=base.atol, rtol=base.rtol, exact=base.exact, equal_nan=base.equal_nan,
                     statistic=base.statistic, overrides=overrides + base.overrides)


def _run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], seed: int,
         loss: Callable[[Any], torch.Tensor] | None) -> Any:
    state = seed_everything(seed, deterministic=False)
    held = {p: p.grad for p in model.parameters()}  # the model's own gradients are neither read nor left changed
    for p in held:
        p.grad = None
    try:
        with capture(model, grads=loss is not None, param_grads=loss is not None) as trace:
            if loss is None:
                with torch.no_grad():
                    model(*args, **kwargs)
            else:
                loss(model(*args, **kwargs)).backward()
    finally:
        state.restore()
        for p, grad in held.items():
            p.grad = grad
    return trace


def noise_floor(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: dict[str, Any] | None = None,
    factor: float = FACTOR,
    ulps: float = ULPS,
    seed: int = 0,
    loss: Callable[[Any], torch.Tensor] | None = None,
    base: Tolerance | None = None,
) -> Tolerance:
    """Measure every layer's float32 noise and return it as a per-layer :class:`Tolerance`.

    The model runs as it is (float32) and a copy of it in float64 (:func:`double_copy`, floating
    inputs cast), both under the same seed, both captured in memory. Each record both runs hold
    (module outputs, the model output, and with ``loss`` the gradients) gets
    ``atol = max(factor · max|x32 - x64|, ulps · eps32 · max|x64|)`` and rtol 0 (see the module
    docstring for why ``factor`` = 3). Use it with the reference as side A:
    ``compare_traces(ref_trace, other_trace, tolerance=noise_floor(ref, x))`` or with
    :func:`~tensorparity.trace._replay.replay`; every comparison's ``tolerance.source`` names the
    override that judged it, so reports state each layer's tolerance.

    Args:
        model: the reference model (its parameters float32); it is not changed.
        inputs: its positional input: a tensor, or a tuple of arguments.
        kwargs: keyword arguments of the call.
        factor: the multiple of the measured error allowed.
        ulps: the floor, in float32 ulps at the tensor's largest magnitude.
        seed: seeded before each run (dropout in training mode draws the same masks only where
            the kernels draw them alike for both dtypes: measure in eval mode).
        loss: ``loss(output) -> scalar``; when given, backward runs too and gradients get
            tolerances as well.
        base: the tolerance for records not measured (default torch's per dtype).

    Example:
        >>> from tensorparity.examples import reference_model
        >>> tol = noise_floor(reference_model(), torch.randn(1, 16, 8))
        >>> 0 < tol.for_key("layers.1.norm2/0/output", torch.float32).atol < 1e-4
        True
    """
    return noise_tolerance(noise_atols(model, inputs, kwargs=kwargs, factor=factor, ulps=ulps, seed=seed, loss=loss),
                           base=base)


def noise_atols(model: nn.Module, inputs: Any, *, kwargs: dict[str, Any] | None = None, factor: float = FACTOR,
                ulps: float = ULPS, seed: int = 0, loss: Callable[[Any], torch.Tensor] | None = None
                ) -> dict[str, float]:
    """The measured atol of every record key (what :func:`noise_floor` turns into a tolerance, and
    what ``tensorparity capture --noise-floor`` stores in the trace).

    Example:
        >>> from tensorparity.examples import reference_model
        >>> atols = noise_atols(reference_model(), torch.randn(1, 16, 8))
        >>> 0 < atols["layers.1.norm2/0/output"] < 1e-4
        True
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"noise_floor needs the reference nn.Module, not {type(model).__name__}",
                         fix="pass the model itself")
    if not (factor > 0 and ulps >= 0):
        raise UsageError(f"factor={factor} must be > 0 and ulps={ulps} >= 0", fix="e.g. factor=3, ulps=4")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kw = dict(kwargs or {})
    double = double_copy(model)
    t32 = _run(model, args, kw, seed, loss)
    t64 = _run(double, to_double(args), to_double(kw), seed, loss)
    by_key = {r.key: r for r in t64.records if r.stored}
    atols: dict[str, float] = {}
    for r in _measured(t32.records):
        other = by_key.get(r.key)
        if other is None or tuple(other.shape) != tuple(r.shape):
            continue
        atols[r.key] = noise_atol(t32.load(r), t64.load(other), factor=factor, ulps=ulps)
    return atols


def recorded_noise_floor(trace: Any, *, base: Tolerance | None = None) -> Tolerance:
    """The tolerance a trace captured with ``--noise-floor`` carries (its provenance's
    ``noise_floor.atols``), for comparing it as side A.

    Raises:
        UsageError: the trace was captured without a noise floor.
    """
    floor = (getattr(trace, "provenance", None) or {}).get("noise_floor")
    atols = floor.get("atols") if isinstance(floor, dict) else None
    if not isinstance(atols, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in atols.values()):
        raise UsageError("trace A holds no measured noise floor", path=getattr(trace, "path", None),
                         fix="capture it with tensorparity capture ... --noise-floor (or pass a Tolerance from "
                             "tensorparity.trace.noise_floor(model, inputs))")
    return noise_tolerance({str(k): float(v) for k, v in atols.items()}, base=base)


def recorded_noise_floor_of(path: Any, rank: int | None = None, *, base: Tolerance | None = None) -> Tolerance:
    """:func:`recorded_noise_floor` of the trace at ``path``; for a multi-rank trace without a
    ``rank``, every rank's floor, each key judged by the loosest rank's (the ranks of one run are
    compared with one tolerance; a rank's floor is its own float32 noise on its own data)."""
    folders = rank_folders(Path(path)) if rank is None and Path(path).is_dir() else {}
    if not folders:
        trace = Trace.open(path, rank=rank)
        try:
            return recorded_noise_floor(trace, base=base)
        finally:
            trace.close()
    merged: dict[str, float] = {}
    for r in sorted(folders):
        trace = Trace.open(path, rank=r)
        try:
            per_rank = recorded_noise_floor(trace)
        finally:
            trace.close()
        for pattern, tol in per_rank.overrides:
            merged[pattern] = max(merged.get(pattern, 0.0), float(tol.atol or 0.0))
    base = base or Tolerance()
    overrides = tuple((pattern, Tolerance(atol=atol, rtol=0.0)) for pattern, atol in merged.items())
    return Tolerance(atol=base.atol, rtol=base.rtol, exact=base.exact, equal_nan=base.equal_nan,
                     statistic=base.statistic, overrides=overrides + base.overrides)


def _measured(records: Sequence[TraceRecord]) -> list[TraceRecord]:
    # Inputs (and parameters) are what the comparison feeds, not what it judges; non-floating
    # records compare exactly.
    return [r for r in records if r.stored and r.kind not in ("input", "model_input", "param", "param_signature")
            and r.dtype in ("float32", "float16", "bfloat16", "float64")]
