"""A live model as one side of a comparison: run it exactly as the other side's trace ran.

``compare_traces(reference_trace, port_model)`` needs a trace of the port made under the same
conditions: the same input, the same train/eval mode, and the same backward pass. The input is
the model input the reference recorded (or one given); the backward pass starts from the
gradient the reference recorded for its model output (``d loss / d output``), so the port's
gradients are those of the reference's loss without knowing what that loss was. Without a
recorded output gradient the port runs forward only. A live model compared with another live
model runs first, with the sum of its outputs as the loss; the other then follows it as above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorparity.checkpoint.tracefolder.reader import Trace, rebuild_call
from tensorparity.checkpoint.tracefolder.records import flatten_value
from tensorparity.errors import UsageError
from tensorparity.trace._capture import capture
from tensorparity.trace.align import RecordSource

__all__ = ["run_like"]


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def run_like(model: nn.Module, reference: RecordSource | None, *, inputs: Any = None) -> Trace:
    """Capture ``model`` (in memory) on the reference's recorded input, in its mode, with its
    backward pass.

    Args:
        model: the live model.
        reference: the trace it will be compared with (``None``: ``inputs`` must be given, and
            the loss is the sum of the model's floating outputs).
        inputs: the input to use instead of the recorded one: a tensor, a tuple of positional
            arguments or a dict of keyword arguments.

    Raises:
        UsageError: no input (none given, none recorded with tensors kept).

    Example:
        >>> import torch
        >>> from tensorparity.trace._capture import capture
        >>> ref = torch.nn.Linear(3, 2)
        >>> with capture(ref) as trace:
        ...     ref(torch.ones(1, 3)).pow(2).sum().backward()
        >>> port = torch.nn.Linear(3, 2); port.load_state_dict(ref.state_dict())
        <All keys matched successfully>
        >>> mine = run_like(port, trace)
        >>> torch.equal(mine.load("<model>/0/param_grad/weight"), trace.load("<model>/0/param_grad/weight"))
        True
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"a live side must be an nn.Module, not {type(model).__name__}",
                         fix="pass the model, a trace, or a trace folder's path")
    records = list(reference.records) if reference is not None else []
    device = _device(model)

    def load(r: Any) -> Any:
        return reference.load(r).to(device)  # type: ignore[union-attr]

    if inputs is not None:
        args, kwargs = _call(inputs)
    else:
        rows = [r for r in records if r.kind == "model_input" and r.call == 0]
        if not rows or any(r.is_tensor and not r.stored for r in rows):
            raise UsageError("no input to run the live model on: the other side recorded no model input tensors",
                             fix="pass inputs=... (or compare against a trace captured in full or window mode)")
        args, kwargs = rebuild_call(rows, load)
    grads = {r.path: r for r in records if r.module == "" and r.call == 0 and r.kind == "grad_output" and r.stored}
    backward = bool(grads) or reference is None  # without a reference: the loss is the sum of the outputs
    training = (reference.provenance.get("training") if reference is not None else None)
    with_inputs = any(r.kind == "input" for r in records)
    modes = {m: m.training for m in model.modules()}
    # Gradients the user's model already holds would be added to: set aside, put back after.
    held = {p: p.grad for p in model.parameters()}
    for p in held:
        p.grad = None
    try:
        if training is not None and model.training != bool(training):
            model.train(bool(training))  # a sub-module left in another mode stays so: it is checked
        with capture(model, inputs=with_inputs, grads=backward, param_grads=backward) as trace:
            with torch.set_grad_enabled(backward):
                out = model(*args, **kwargs)
            if reference is None:
                floats = [t for _, t in flatten_value(out) if isinstance(t, torch.Tensor) and t.requires_grad]
                if floats:
                    torch.stack([t.float().sum() for t in floats]).sum().backward()
            elif grads:
                leaves = [(p, t) for p, t in flatten_value(out) if isinstance(t, torch.Tensor) and t.requires_grad]
                pairs = [(t, load(grads[p])) for p, t in leaves if p in grads]
                if not pairs and len(leaves) >= 1 and len(grads) == 1:
                    pairs = [(leaves[0][1], load(next(iter(grads.values()))))]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
    finally:
        for m, was in modes.items():
            m.training = was
        for p, grad in held.items():
            p.grad = grad
    return trace
