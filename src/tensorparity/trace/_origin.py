"""Introduced or inherited: for every mismatched layer, is its error its own or did it arrive with
its input?

**Forward.** A layer's *input error* is the largest of

- the error of what it received: its recorded ``input`` records when the capture kept them, else
  the error already present when it started: the errors of the layers that finished since its
  parent started (its earlier siblings and everything inside them), or, for a first child, its
  parent's input error; the model's input error at the top;
- the error of what its own sub-layers returned (a block whose norm diverged inherits from it).

When both sides recorded a sub-layer's inputs and those differ although nothing that ran before it
inside its parent did, the parent's own code between its sub-layers (a residual, a mask, a scale)
made the error: the parent *introduced* it and the sub-layer inherited it from the parent.

The tree is A's, rebuilt from execution order (a module's sub-layers finish before it does). A
mismatched layer *introduced* the error when its output's relative error exceeds its input error
by ``margin`` (10×), else it *inherited* it, from the layer the largest input error came from,
followed back to a layer that introduced one. Layers without a partner in B count as unknown
(no error). Two bugs in parallel branches (q and v projections) can make the second look
inherited; the first divergence is always right.

**Backward.** A layer whose outputs match but whose gradients differ introduced the error when
the error of its gradients w.r.t. input and parameters exceeds that of its gradient w.r.t.
output by ``margin``; without a recorded gradient w.r.t. output, when no layer before it in
backward order differs.

**Healed.** A mismatched layer whose nearest paired ancestor (the module it runs inside, up to the
whole model) matches again, in the same direction, differs in layout, not in value: a
re-parametrisation (q/k rows permuted for another RoPE convention, heads reordered) that the code
between the layers undoes. It is reported as *healed at* that ancestor, never as the first
divergence, and passes no error on (its error counts as 0 for the layers after it). So is a layer
whose differing outputs hold, token by token, the same values in another order (its features
permuted), even where a real bug elsewhere in the ancestor keeps the ancestor from matching: a
reordering is a layout, and the bug is then found where it is. Parameter
gradients heal only where they hold the same values in another order (the weights are stored in
another layout and the gradient follows them); otherwise a parameter whose gradient differs is
stepped differently, and the layer is a mismatch.

A's module tree is rebuilt from execution order: forward hooks fire when a module *finishes*, so
when a layer finishes, the layers that finished since it started and lie under its module path are
its sub-layers. Works for modules called several times and for any nesting, in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tensorparity.trace.align import TraceLayer

__all__ = ["Origin", "classify"]

MODEL_INPUT = "<model input>"
_Err = tuple[float, str | None]  # (relative error, the layer it was measured at)


class _LayerLike(Protocol):
    match: Any
    slots: dict[str, list[Any]]


@dataclass(frozen=True)
class Healed:
    """Where a layer's difference heals, and in which directions (``forward``, ``backward``)."""

    at: str | None  # the ancestor that matches again (None: only known to be a reordering)
    directions: tuple[str, ...]
    reordered: bool = False  # some direction holds the same values in another order


@dataclass
class Origin:
    """What :func:`classify` found for one aligned layer."""

    error: float = 0.0
    input_error: float = 0.0
    source: str | None = None
    recorded_input: float | None = None
    backward_error: float = 0.0
    backward_input_error: float | None = None
    origin: str | None = None
    inherited_from: str | None = None
    healed_at: str | None = None
    healed_directions: tuple[str, ...] = ()

    def as_fields(self) -> dict[str, Any]:
        return {"error": self.error, "input_error": self.input_error, "backward_error": self.backward_error,
                "backward_input_error": self.backward_input_error, "origin": self.origin,
                "inherited_from": self.inherited_from, "healed_at": self.healed_at,
                "healed_directions": self.healed_directions}


def _failed(jobs: Sequence[Any]) -> bool:
    return any(j.result is not None and not j.result.passed for j in jobs)


def _max(jobs: Sequence[Any]) -> float:
    return max((j.error for j in jobs), default=0.0)


def _under(module: str, parent: str) -> bool:
    return module != parent and (parent == "" or module.startswith(parent + "."))


def _tree(layers: Sequence[TraceLayer]) -> tuple[dict[tuple[str, int], list[TraceLayer]], list[TraceLayer]]:
    """Children of each layer (by ``(module, call)``) and the top-level layers, from finish order."""
    children: dict[tuple[str, int], list[TraceLayer]] = {}
    pending: list[TraceLayer] = []
    for layer in sorted((x for x in layers if x.outputs), key=lambda x: x.order):
        mine = []
        while pending and _under(pending[-1].module, layer.module):
            mine.append(pending.pop())
        children[(layer.module, layer.call)] = mine[::-1]
        pending.append(layer)
    return children, pending


def _worst(items: Sequence[_Err], default: _Err = (0.0, None)) -> _Err:
    """The largest error (the earliest of equals)."""
    best = default
    for item in items:
        if item[0] > best[0] or (best[1] is None and item[0] == best[0] and item[1] is not None and item[0] > 0):
            best = item
    return best


def classify(all_a: Sequence[TraceLayer], layers: Sequence[_LayerLike], margin: float,
             inputs_differ: bool) -> dict[int, Origin]:
    """Errors, input errors and origins of the aligned layers (indices into ``layers``)."""
    index = {(x.match.a.module, x.match.a.call): i for i, x in enumerate(layers)}
    info = {i: Origin() for i in range(len(layers))}
    model_input = 0.0
    for i, x in enumerate(layers):
        o = info[i]
        o.error = _max(x.slots["forward"])
        inputs = [j for j in x.slots["inputs"] if j.ra.kind == "input"]
        o.recorded_input = _max(inputs) if inputs else None
        model_input = max(model_input, _max([j for j in x.slots["inputs"] if j.ra.kind == "model_input"]))
    if inputs_differ:
        model_input = max(model_input, math.inf)
    children, tops = _tree(all_a)
    healed = _healed(layers, index, children, tops)
    for i, h in healed.items():
        info[i].healed_at, info[i].healed_directions = h.at, h.directions
    fwd_healed = {i for i, h in healed.items() if "forward" in h.directions}
    bwd_healed = {i for i, h in healed.items() if "backward" in h.directions}
    own: dict[tuple[str, int], _Err] = {}
    subtree: dict[tuple[str, int], _Err] = {}
    for layer in sorted((x for x in all_a if x.outputs), key=lambda x: x.order):  # children first
        key = (layer.module, layer.call)
        i = index.get(key)
        # A healed layer's difference is one of layout: it passes no error on.
        own[key] = (info[i].error, layer.name) if i is not None and i not in fwd_healed else (0.0, None)
        subtree[key] = _worst([subtree[(c.module, c.call)] for c in children[key]], own[key])

    # Top-down, iteratively: (siblings, the error present before the first of them started, parent).
    glue: set[int] = set()  # parents whose own code (between their sub-layers) introduced an error
    stack: list[tuple[list[TraceLayer], _Err, int | None]] = [
        (tops, (model_input, MODEL_INPUT if model_input else None), None)]
    while stack:
        kids, running, parent = stack.pop()
        for c in kids:
            key = (c.module, c.call)
            before = running
            i = index.get(key)
            got = info[i].recorded_input if i is not None else None
            if got is not None:
                before = (got, running[1] if got > 0 else None)
                if got > 0 and got > margin * running[0] and parent is not None:
                    # It received an error that nothing before it produced: the parent's own code
                    # between its sub-layers (a residual, a mask, a scale) made it.
                    before = (got, layers[parent].match.a.name)
                    glue.add(parent)
            inside = _worst([subtree[(k.module, k.call)] for k in children[key]])
            if i is not None:
                info[i].input_error, info[i].source = _worst([before, inside])
            stack.append((children[key], before, i if i is not None else parent))  # nearest paired ancestor
            running = _worst([subtree[key]], running)

    names = {x.match.a.name: i for i, x in enumerate(layers)}
    for i, x in enumerate(layers):
        o = info[i]
        if i not in fwd_healed and _failed(x.slots["forward"] + x.slots["inputs"]):
            o.origin = "introduced" if o.error > margin * o.input_error or i in glue else "inherited"
            if i in glue:
                o.source = None
    first_forward = None
    for i in sorted(info, key=lambda k: layers[k].match.a.order):
        o = info[i]
        if o.origin == "inherited":
            o.inherited_from = _resolve(o.source, info, names)
        elif o.origin == "introduced" and first_forward is None:
            first_forward = layers[i].match.a.name
    _backward(layers, info, margin, first_forward, bwd_healed)
    return info


def _activation_jobs(jobs: Sequence[Any]) -> list[Any]:
    return [j for j in jobs if j.ra.kind != "param_grad"]


def _healed(layers: Sequence[_LayerLike], index: dict[tuple[str, int], int],
            children: dict[tuple[str, int], list[TraceLayer]], tops: list[TraceLayer]) -> dict[int, Healed]:
    """Mismatched layers whose nearest paired ancestor matches again in the same direction: the
    layer's index -> that ancestor's name and the directions healed (see the module docstring)."""
    parent: dict[tuple[str, int], tuple[str, int] | None] = {(t.module, t.call): None for t in tops}
    for key, kids in children.items():
        for c in kids:
            parent[(c.module, c.call)] = key
    found: dict[int, Healed] = {}
    for i, x in enumerate(layers):
        if not x.match.a.module:
            continue  # the whole model's outputs are what a port must get right
        bwd = x.slots["backward"]
        wanted = [d for d, bad in (("forward", _failed(x.slots["forward"] + x.slots["inputs"])),
                                   ("backward", _failed(_activation_jobs(bwd)))) if bad]
        if "backward" in wanted and not all(_is_reordered(j) for j in bwd if j.ra.kind == "param_grad"
                                            and j.result is not None and not j.result.passed):
            wanted.remove("backward")  # a parameter gradient differs in value: stepped differently
        at, done, reordered = None, [], False
        for direction in wanted:
            key = parent.get((x.match.a.module, x.match.a.call))
            while key is not None and (key not in index or not _compared(layers[index[key]], direction)):
                key = parent.get(key)
            if key is not None and not _failed(_direction_jobs(layers[index[key]], direction)):
                at = at or layers[index[key]].match.a.name
                done.append(direction)
            elif _reordered(_direction_jobs(x, direction)):
                done.append(direction)
                reordered = True
        if done:
            found[i] = Healed(at, tuple(done), reordered)
    return found


def _reordered(jobs: Sequence[Any]) -> bool:
    """Every failing comparison holds the same values in another order (see ``sorted_values``),
    inputs and gradients w.r.t. input included (they must match as they are)."""
    bad = [j for j in jobs if j.result is not None and not j.result.passed]
    return bool(bad) and all(_is_reordered(j) for j in bad)


def _is_reordered(job: Any) -> bool:
    check = getattr(job, "is_reordered", None)
    return bool(check()) if callable(check) else getattr(job, "reordered", None) is not None


def _direction_jobs(layer: _LayerLike, direction: str) -> list[Any]:
    if direction == "forward":
        return list(layer.slots["forward"]) + list(layer.slots["inputs"])
    return _activation_jobs(layer.slots["backward"])


def _compared(layer: _LayerLike, direction: str) -> bool:
    """Whether a layer can be the point where a sub-layer's difference heals: in the forward pass
    it has outputs compared; in the backward pass its gradient w.r.t. input (what leaves it after
    its sub-layers ran; its gradient w.r.t. output arrived before them)."""
    if direction == "forward":
        return bool(layer.slots["forward"])
    return any(j.ra.kind == "grad_input" for j in layer.slots["backward"])


def _resolve(source: str | None, info: dict[int, Origin], names: dict[str, int]) -> str | None:
    """Follow where an inherited error came from back to the layer that introduced it."""
    seen: set[str] = set()
    while source is not None and source in names and source not in seen:
        seen.add(source)
        o = info[names[source]]
        if o.origin != "inherited" or o.source is None:
            return source
        source = o.source
    return source


def _backward(layers: Sequence[_LayerLike], info: dict[int, Origin], margin: float, first_forward: str | None,
              healed: set[int]) -> None:
    """Backward errors, and origins of layers whose outputs match but whose gradients differ."""
    order = sorted(range(len(layers)), key=lambda i: (layers[i].match.a.backward_order is None,
                                                      layers[i].match.a.backward_order or 0))
    last_introduced, seen_failure = first_forward, False
    for i in order:
        jobs = layers[i].slots["backward"]
        grad_out = [j for j in jobs if j.ra.kind == "grad_output"]
        rest = [j for j in jobs if j.ra.kind != "grad_output"]
        o = info[i]
        o.backward_input_error = _max(grad_out) if grad_out else None
        o.backward_error = _max(rest)
        failed = _failed(jobs) and i not in healed
        if failed and o.origin is None:
            if o.backward_input_error is not None:
                introduced = o.backward_error > margin * o.backward_input_error
            else:
                introduced = not seen_failure
            o.origin = "introduced" if introduced else "inherited"
            if introduced:
                last_introduced = layers[i].match.a.name
            else:
                o.inherited_from = last_introduced
        seen_failure |= failed
