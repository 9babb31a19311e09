"""What ``tensorparity capture`` runs (imported when the command runs, not when the CLI starts):
build the model under a seed, build its input, run forward and backward inside
:func:`~tensorparity.trace._capture.capture`, and write the trace, replacing an old one only as a
whole."""

from __future__ import annotations

import inspect
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tensorparity._atomic import atomic_output
from tensorparity._factory import build_model
from tensorparity._output import refuse_inputs
from tensorparity._resolve import FactoryError, resolve_object
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.tracefolder.format import MANIFEST, rank_folders
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import flatten_value
from tensorparity.checkpoint.tree import TensorEntry
from tensorparity.errors import TensorParityError, UsageError
from tensorparity.trace._capture import _rank_world, capture
from tensorparity.trace.noise import FACTOR, noise_atols
from tensorparity.trace.seed import InputSpec, build_inputs, input_hash, reproducible

__all__ = ["capture_run", "render_capture"]

_FACTORY = "'pkg.module:function', 'pkg.module:Class' or 'path/to/file.py:function'"


def _resolve(text: str, role: str) -> Callable[..., Any]:
    """A user's ``module:function`` (or ``file.py:function``), imported but not called."""
    obj = resolve_object(text, noun=role)
    if not callable(obj):
        raise FactoryError(f"the {role} {text!r} is a {type(obj).__name__}, not a function",
                           fix=f"name a function: {_FACTORY}")
    return obj


def _as_call(value: Any, role: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), dict(value)
    raise UsageError(f"the {role} returned a {type(value).__name__}",
                     fix="return a tensor (model(x)), a tuple (model(*args)) or a dict (model(**kwargs))")


def _load_checkpoint(model: torch.nn.Module, checkpoint: str) -> str:
    """Load a checkpoint's model weights strictly; returns a hash of the weights as loaded."""
    with open_checkpoint(checkpoint) as ckpt:
        weights = ckpt.weights()
        state = {k: e.load() for k, e in weights.items() if isinstance(e, TensorEntry)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        raise UsageError("the checkpoint does not load into the model: " + ", ".join(parts), path=checkpoint,
                         fix="run `tensorparity load-check CKPT MODEL` to see every problem")
    model.load_state_dict(state, strict=True)
    return input_hash(state)


def _default_loss(output: Any) -> torch.Tensor:
    parts = [t.float().sum() for _, t in flatten_value(output)
             if isinstance(t, torch.Tensor) and t.requires_grad and (t.is_floating_point() or t.is_complex())]
    if not parts:
        raise UsageError("the model's output holds no tensor that requires grad, so there is no backward pass",
                         fix="pass --no-backward, or check that the model's parameters require grad")
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def capture_run(
    factory: Any,
    out: str | Path,
    *,
    input_spec: list[str] | None = None,
    input_fn: str | None = None,
    checkpoint: str | None = None,
    mode: str = "full",
    window: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    types: list[str] | None = None,
    inputs: bool = False,
    seed: int = 0,
    backward: bool = True,
    loss: str | None = None,
    device: str | None = None,
    train: bool = False,
    noise_floor: bool = False,
    params: bool = True,
    overwrite: bool = False,
    dtensor: str = "local",
    local_grads: bool = False,
) -> Trace:
    """What ``tensorparity capture`` does: build the model under ``seed`` (weights from
    ``checkpoint`` if given), build the input from ``input_spec`` (or ``input_fn``), run forward
    and (unless ``backward=False``) backward on ``loss`` (default ``output.float().sum()``)
    inside :func:`~tensorparity.trace._capture.capture`, and write the trace to ``out``. With
    ``noise_floor``, the model is first run in float32 and (a copy) in float64 on the same input,
    and every record's measured atol is stored in the provenance (``noise_floor``), so that
    ``tensorparity compare --noise-floor`` judges each layer by its own numerical noise. With
    ``params`` (the default) every parameter is recorded too, as the forward began. ``dtensor``
    and ``local_grads`` are :func:`~tensorparity.trace._capture.capture`'s (DTensors as local
    shards or gathered; local pre-all-reduce gradients too).

    Example:
        >>> import tempfile
        >>> t = capture_run("tensorparity.examples:reference_model", tempfile.mkdtemp() + "/t",
        ...                 input_spec=["2x16x20:float32"])
        >>> t.provenance["input_spec"], t.provenance["seed"]
        (['2x16x20:float32:seed=0'], 0)
    """
    if bool(input_spec) == bool(input_fn):
        raise UsageError("give the model's input: --input-spec SHAPE:DTYPE (repeatable) or --input pkg.mod:fn",
                         fix="e.g. --input-spec 2x16x20:float32, or --input mymodels:make_input")
    replacing = _check_out(Path(out), checkpoint, overwrite)
    specs = [InputSpec.parse(s, seed=seed) for s in input_spec or []]
    make_input = _resolve(input_fn, "input function") if input_fn else None
    loss_fn = _resolve(loss, "loss function") if loss else _default_loss
    run_device = torch.device(device) if device else None
    with reproducible(seed):
        built = build_model(factory)
        model = built.model
        provenance: dict[str, Any] = {"factory": built.factory}
        if checkpoint is not None:
            provenance.update(checkpoint=str(checkpoint), checkpoint_hash=_load_checkpoint(model, checkpoint))
        if run_device is not None:
            model.to(run_device)
        model.train(train)
        if make_input is not None:
            try:
                args, kwargs = _as_call(make_input(), "input function")
            except TensorParityError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's function
                raise UsageError(f"the input function {input_fn!r} raised {type(exc).__name__}: {exc}",
                                 fix="run it in Python to see the traceback") from exc
            if run_device is not None:
                args, kwargs = _to(args, run_device), _to(kwargs, run_device)
            provenance["input_function"] = input_fn
        else:
            args, kwargs = build_inputs(specs, run_device)
            provenance["input_spec"] = [str(s) for s in specs]
        _check_call(model, args, kwargs)
        provenance["loss"] = loss if loss else ("output.float().sum()" if backward else None)
        if noise_floor:
            atols = noise_atols(model, args, kwargs=kwargs, seed=seed, loss=loss_fn if backward else None)
            provenance["noise_floor"] = {"factor": FACTOR, "atols": atols}
        options = dict(mode=mode, window=window, include=include or None, exclude=exclude or None,
                       types=types or None, inputs=inputs, params=params, provenance=provenance,
                       dtensor=dtensor, local_grads=local_grads)
        if replacing:  # the new trace is written beside the old one and swapped in once complete
            with atomic_output(out) as tmp, capture(model, out=tmp, **options):  # type: ignore[arg-type]
                _run(model, args, kwargs, loss_fn if backward else None)
            return Trace.open(out)
        created = not Path(out).exists()
        try:
            with capture(model, out=out, **options) as trace:  # type: ignore[arg-type]
                _run(model, args, kwargs, loss_fn if backward else None)
        except BaseException:
            if created:  # a failed run leaves no half-written trace behind in a folder it made
                shutil.rmtree(out, ignore_errors=True)
            raise
    return trace


def _check_out(out: Path, checkpoint: str | None, overwrite: bool) -> bool:
    """Whether ``out`` holds a trace to replace; refuses a non-empty folder without ``overwrite``,
    anything but a trace even with it, and a folder holding the checkpoint."""
    refuse_inputs(out, [checkpoint if checkpoint and Path(checkpoint).exists() else None], "the trace")
    rank, world = _rank_world(None)
    if world > 1:
        # Under torchrun every rank writes out/rank-<r>/: only this rank's own folder must be new
        # (the others' appear beside it while it starts).
        mine = out / f"rank-{rank}"
        if mine.exists() and (not mine.is_dir() or any(mine.iterdir())):
            raise UsageError(f"rank {rank}'s folder already exists", path=mine,
                             fix="choose a new folder for the trace (-o); --overwrite replaces one-process "
                                 "traces only")
        return False
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise UsageError("the output is a file; a trace is a folder", path=out, fix="choose a new folder (-o)")
    if not ((out / MANIFEST).is_file() or rank_folders(out)):
        raise UsageError("exists and is not a trace (no manifest.json); a trace is never written over other files, "
                         "even with --overwrite", path=out, fix="choose a new folder for the trace (-o)")
    if not overwrite:
        raise UsageError("the output folder exists and holds a trace", path=out,
                         fix="pass --overwrite to replace it, or choose a new folder (-o)")
    return True


def _run(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
         loss_fn: Callable[[Any], torch.Tensor] | None) -> None:
    step = "forward"
    try:
        try:
            output = model(*args, **kwargs)
        except TypeError as exc:
            if _refuses_call(model, exc, args):
                raise _refused(model, str(exc)) from exc
            raise
        if loss_fn is not None:
            step = "loss"
            value = loss_fn(output)
            step = "backward"
            value.backward()
    except TensorParityError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model
        raise UsageError(f"the model raised {type(exc).__name__} during {step}: {exc}",
                         fix="run the model on this input in Python to see the traceback") from exc


def _forward_params(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _refused(model: torch.nn.Module, why: str) -> UsageError:
    """A model whose forward refuses the input's arguments: name its parameters and the fix."""
    signature = _forward_params(model)
    params = list(signature.parameters.values()) if signature is not None else []
    shown, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            shown.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        shown.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    example = f"{named[0]}=SHAPE:DTYPE" if named else "NAME=SHAPE:DTYPE"
    return UsageError(f"the model ({type(model).__name__}) refuses its input as given: {' '.join(why.split())}; its "
                      f"forward takes ({', '.join(shown)})",
                      fix=f"pass keyword inputs with --input-spec NAME=SPEC (repeatable, e.g. --input-spec {example}; "
                          "':lengths' adds NAME_length), or --input module:function returning a dict")


def _check_call(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before anything runs, an input that forward's signature cannot bind."""
    signature = _forward_params(model)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise _refused(model, f"{exc} ({len(args)} positional, {len(kwargs)} keyword)") from None


# A TypeError that forward itself raised about how it was called (NeMo's typed methods take
# keywords only: "All arguments must be passed by kwarg only for typed methods").
_CALL_ERRORS = re.compile(r"kwarg only|keyword.only|by keyword|positional argument|required (positional )?argument|"
                          r"unexpected keyword argument|multiple values for argument")


def _refuses_call(model: torch.nn.Module, exc: TypeError, args: tuple[Any, ...]) -> bool:
    text = str(exc)
    if not _CALL_ERRORS.search(text):
        return False
    own = f"{type(model).__qualname__}.forward()"  # Python's own binding message names the method
    return own in text or (bool(args) and "kwarg" in text)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
