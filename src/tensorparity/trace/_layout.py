"""Activation layouts from weight transforms: a mapping that permutes, rearranges, splits or
concatenates a module's weight along its output dimension says that the module's *outputs* are
permuted, rearranged, split or concatenated the same way (and a transform along the input
dimension, that its *inputs* are).

**What is derived.** For every mapping rule that makes a module's weight of B from weights of A
(the ``weight`` parameter, else a 1-d ``bias``), the rule's own transform is run once on *index
probes*: A's weight filled with each row's position along its output dimension (offset by the
sizes of the parts before it, for a concat of several), and once filled with the position along
its input dimension. Where B's weight then holds one position per output row (constant along every
other dimension), those positions are a gather index: ``B's output = cat(A's outputs)[..., index]``,
and the same for inputs. So any transform that only moves data (rearrange, permute, transpose,
reshape, concat, split, chains of them, and the ones a project registers) is covered, with no rule
written per transform; casts change values, not places, and are left out of the probe.

Which dimension of a weight holds the outputs (and which axis of the activation is the feature
axis) depends on the module class:

===========================================  ===========  ==========  =================
class                                        weight out   weight in   activation axis
===========================================  ===========  ==========  =================
``Linear`` and any unknown class             0            1           last
Hugging Face ``Conv1D`` (weight [in, out])   1            0           last
``Embedding``, ``EmbeddingBag``              1            (indices)   last
``Conv1d/2d/3d``                             0            1           1 (channels)
``ConvTranspose1d/2d/3d``                    1            0           1 (channels)
1-d weight (norms: elementwise affine)       0            0           last
===========================================  ===========  ==========  =================

A derivation is kept only when the sizes agree with what was recorded: the weight's output size
must be the size of the module's output on its feature axis, on both sides (an
``nn.MultiheadAttention``'s packed ``in_proj_weight`` is 3·E rows for an output of E features:
no layout is derived from it, and the report says so). Transforms that mix rows and columns, or
change values, derive nothing.

**How it is used.** Compare and replay transform A's recorded outputs and gradients w.r.t.
outputs with the output index, A's inputs and gradients w.r.t. inputs with the input index; a
fused module on one side and its parts on the other compare as one concatenated output.
Parameter gradients go through the mapping itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.tracefolder.records import TensorStats, TraceRecord
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.mapping import Chain, Mapping, MappingError, apply_mapping
from tensorparity.mapping.transforms import Cast, TransformSpecError
from tensorparity.numerics.gathered import Gather, gather

__all__ = ["Gathered", "Layout", "combine_stats", "derive_layouts", "feature_axis", "gather", "param_shapes",
           "reorder_of"]

# class name -> (weight's output dim, weight's input dim or None, activation feature axis)
_DIMS: dict[str, tuple[int, int | None, int]] = {
    "Conv1D": (1, 0, -1), "Embedding": (1, None, -1), "EmbeddingBag": (1, None, -1),
    "Conv1d": (0, 1, 1), "Conv2d": (0, 1, 1), "Conv3d": (0, 1, 1),
    "LazyConv1d": (0, 1, 1), "LazyConv2d": (0, 1, 1), "LazyConv3d": (0, 1, 1),
    "ConvTranspose1d": (1, 0, 1), "ConvTranspose2d": (1, 0, 1), "ConvTranspose3d": (1, 0, 1),
}


def _dims(module_type: str, ndim: int) -> tuple[int, int | None, int]:
    known = _DIMS.get(module_type.rsplit(".", 1)[-1])
    if known is not None:
        return known
    return (0, 0, -1) if ndim == 1 else (0, 1, -1)


def feature_axis(module_type: str) -> int:
    """The axis of a module's activations that holds its features (``-1``, or ``1`` for convolutions).

    Example:
        >>> feature_axis("torch.nn.modules.linear.Linear"), feature_axis("torch.nn.modules.conv.Conv2d")
        (-1, 1)
    """
    return _DIMS.get(module_type.rsplit(".", 1)[-1], (0, 1, -1))[2]


@dataclass(frozen=True)
class Layout:
    """How the activations of a group of A's modules become those of a group of B's.

    Attributes:
        a, b: module paths (several on a side: a fused module on the other).
        rule: the index of the mapping rule it was derived from; ``transform``: that rule's
            transform, described.
        out_index: gather index over A's outputs concatenated on their feature axis (``None``:
            they are B's as they are, concatenated where several).
        in_index: gather index over A's input features (``None``: inputs are the same).
        axis_a, axis_b: the feature axis of each side's activations.
        problem: why no layout could be derived (the layers are then compared without one).
    """

    a: tuple[str, ...]
    b: tuple[str, ...]
    rule: int
    transform: str
    out_index: torch.Tensor | None = None
    in_index: torch.Tensor | None = None
    axis_a: int = -1
    axis_b: int = -1
    problem: str | None = None

    @property
    def grouped(self) -> bool:
        return len(self.a) > 1 or len(self.b) > 1

    @property
    def trivial(self) -> bool:
        """Nothing to do: one module a side, outputs and inputs as they are."""
        return not self.grouped and self.out_index is None and self.in_index is None

    def describe(self) -> str:
        """A few words for a report: what was done to A's activations, and from which rule."""
        if self.problem:
            return f"no layout from rules[{self.rule}]: {self.problem}"
        parts = []
        if len(self.a) > 1:
            parts.append(f"A's {len(self.a)} outputs concatenated")
        if self.out_index is not None:
            parts.append("output features reordered")
        if len(self.b) > 1:
            parts.append(f"compared with B's {len(self.b)} outputs concatenated")
        if self.in_index is not None:
            parts.append("input features reordered")
        return f"{', '.join(parts) or 'as they are'} (rules[{self.rule}]: {self.transform})"

    def to_dict(self) -> dict[str, Any]:
        return {"a": list(self.a), "b": list(self.b), "rule": self.rule, "transform": self.transform,
                "reordered_outputs": self.out_index is not None, "reordered_inputs": self.in_index is not None,
                "problem": self.problem, "description": self.describe()}


def param_shapes(records: Iterable[TraceRecord]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``owner.name`` -> (shape, owner's module type), from parameter (or parameter-gradient) records."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for r in records:
        if r.kind in ("param", "param_grad") and r.is_tensor:
            out.setdefault(f"{r.module}.{r.path}" if r.module else r.path, (tuple(r.shape), r.module_type))
    return out


def _without_casts(mapping: Mapping) -> Mapping:
    rules = []
    for rule in mapping.rules:
        t = rule.transform
        if isinstance(t, Cast):
            t = None
        elif isinstance(t, Chain):
            steps = tuple(s for s in t.steps if not isinstance(s, Cast))
            t = Chain(steps) if steps else None
        rules.append(replace(rule, transform=t) if t is not rule.transform else rule)
    return mapping.with_rules(rules)


def _probe(shape: tuple[int, ...], dim: int, offset: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return (torch.arange(shape[dim], dtype=torch.float32) + offset).view(view).expand(shape).contiguous()


def _positions(t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The values along ``dim`` when ``t`` is constant along every other dimension, else ``None``."""
    if t.dim() == 0 or not -t.dim() <= dim < t.dim():
        return None
    moved = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    if moved.shape[1] and not bool((moved == moved[:, :1]).all()):
        return None
    col = moved[:, 0] if moved.shape[1] else moved.new_zeros(0)
    if not bool((col == col.round()).all()):
        return None
    return col.to(torch.long)


@dataclass(frozen=True)
class _Side:
    """What a trace says of its modules: class, output features, input features (first call)."""

    types: dict[str, str]
    out_features: dict[str, tuple[int, ...]]
    in_features: dict[str, tuple[int, ...]]


def _side(layers: Sequence[Any]) -> _Side:
    types, outs, ins = {}, {}, {}
    for x in layers:
        if x.call != 0 or not x.module:
            continue
        types[x.module] = x.module_type
        o = x.of_kind("output")
        if o:
            outs[x.module] = tuple(o[0].shape)
        i = [r for r in x.of_kind("input") if r.dtype.startswith(("float", "bfloat", "complex"))]
        if i:
            ins[x.module] = tuple(i[0].shape)
    return _Side(types, outs, ins)


def _weight_key(keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k.rsplit(".", 1)[-1].endswith("weight")), None)


def derive_layouts(mapping: Mapping, params_a: dict[str, tuple[tuple[int, ...], str]],
                   params_b: dict[str, tuple[tuple[int, ...], str]], layers_a: Sequence[Any],
                   layers_b: Sequence[Any]) -> list[Layout]:
    """Every module group whose activations the mapping transforms (see the module docstring).

    Args:
        mapping: A's parameter keys -> B's.
        params_a, params_b: :func:`param_shapes` of each side.
        layers_a, layers_b: each side's layers (:func:`~tensorparity.trace.align.group_layers`).

    Returns:
        One :class:`Layout` per group of modules a rule transforms (trivial renames left out);
        a layout with ``problem`` set where a rule transforms weights but no activation layout
        follows from it.
    """
    side_a, side_b = _side(layers_a), _side(layers_b)
    weights = {k: v for k, v in params_a.items() if k.rsplit(".", 1)[-1].endswith(("weight", "bias"))}
    if not weights:
        return []
    probe_map = _without_casts(mapping)
    out_entries, in_entries = {}, {}
    for key, (shape, mtype) in weights.items():
        if not shape:
            continue
        d_out, d_in, _ = _dims(mtype, len(shape))
        if d_out >= len(shape):
            continue
        out_entries[key] = (shape, d_out)
        if d_in is not None and d_in < len(shape):
            in_entries[key] = (shape, d_in)
    try:
        mapped = apply_mapping(open_checkpoint({k: LazyTensor(s, torch.float32, 0, k, lambda: None)
                                                for k, (s, _) in out_entries.items()}), probe_map)
    except (MappingError, TransformSpecError):
        return []
    groups: dict[tuple[str, ...], list[str]] = {}
    for target, sources in mapped.claims.items():
        rule = mapped.rule_of.get(target)
        if rule is None:
            continue
        groups.setdefault(tuple(sources), []).append(target)
    chosen: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[tuple[str, ...], list[str]]] = {}
    for sources, targets in groups.items():
        mods = (tuple(s.rpartition(".")[0] for s in sources),
                tuple(t.removeprefix(mapping.prefix_b).rpartition(".")[0] for t in targets))
        if mods not in chosen or _weight_key(sources) is not None:  # the weight speaks for its module
            chosen[mods] = (sources, targets)
    cache: dict[Any, tuple[torch.Tensor | None, torch.Tensor | None, str | None]] = {}
    layouts = []
    for (mods_a, mods_b), (sources, targets) in chosen.items():
        rule = mapped.rule_of[targets[0]]
        assert rule is not None
        if len(sources) == 1 and len(targets) == 1 and mapping.rules[rule].transform is None:
            continue  # a plain rename: the module renames of the alignment cover it
        desc = mapping.rules[rule].transform.describe() if mapping.rules[rule].transform else "renamed"
        shapes_b = tuple(params_b.get(t, ((), ""))[0] for t in targets)
        key = (rule, tuple(out_entries[s][0] for s in sources), shapes_b,
               tuple(side_a.types.get(m, "") for m in mods_a), tuple(side_b.types.get(m, "") for m in mods_b))
        if key not in cache:
            cache[key] = _derive(mapped, probe_map, sources, targets, mods_a, mods_b, out_entries, in_entries,
                                 side_a, side_b, params_b)
        out_index, in_index, problem = cache[key]
        axis_a = feature_axis(side_a.types.get(mods_a[0], ""))
        axis_b = feature_axis(side_b.types.get(mods_b[0], ""))
        layout = Layout(mods_a, mods_b, rule, desc, out_index, in_index, axis_a, axis_b, problem)
        if not layout.trivial or problem:
            layouts.append(layout)
    order = {x.module: x.order for x in layers_a if x.call == 0}
    return sorted(layouts, key=lambda x: (order.get(x.a[0], len(order)), x.a))


def _derive(mapped: Any, probe_map: Mapping, sources: tuple[str, ...], targets: list[str], mods_a: tuple[str, ...],
            mods_b: tuple[str, ...], out_entries: dict[str, Any], in_entries: dict[str, Any], side_a: _Side,
            side_b: _Side, params_b: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """Output and input gather indices of one group, or why there are none."""
    sizes, offset, probes = [], 0, {}
    for s, m in zip(sources, mods_a, strict=True):
        shape, dim = out_entries[s]
        probes[s] = _probe(shape, dim, offset)
        sizes.append(shape[dim])
        offset += shape[dim]
        feat = side_a.out_features.get(m)
        axis = feature_axis(side_a.types.get(m, ""))
        if feat is None:
            return None, None, f"A's {m} recorded no output"
        if not -len(feat) <= axis < len(feat) or feat[axis] != shape[dim]:
            return None, None, (f"A's {s} has {shape[dim]} output rows but {m}'s output has "
                                f"{feat[axis] if -len(feat) <= axis < len(feat) else '?'} features")
    out = _run_probe(probe_map, probes, targets)
    if isinstance(out, str):
        return None, None, out
    index = []
    for t, m in zip(targets, mods_b, strict=True):
        shape_b = tuple(out[t].shape)
        d_out, _, axis = _dims(side_b.types.get(m, ""), len(shape_b))
        pos = _positions(out[t], d_out)
        if pos is None:
            return None, None, f"{t}: the transform mixes its output rows with other dimensions"
        feat = side_b.out_features.get(m)
        if feat is None:
            return None, None, f"B's {m} recorded no output"
        if not -len(feat) <= axis < len(feat) or feat[axis] != len(pos):
            return None, None, f"B's {t} has {len(pos)} output rows but {m}'s output has other features"
        index.append(pos)
    full = torch.cat(index)
    out_index = None if torch.equal(full, torch.arange(offset)) else full
    return out_index, _input_index(probe_map, sources, targets, mods_b, in_entries, side_b), None


def _input_index(probe_map: Mapping, sources: tuple[str, ...], targets: list[str], mods_b: tuple[str, ...],
                 in_entries: dict[str, Any], side_b: _Side) -> torch.Tensor | None:
    if not all(s in in_entries for s in sources):
        return None
    probes = {s: _probe(in_entries[s][0], in_entries[s][1], 0) for s in sources}
    out = _run_probe(probe_map, probes, targets)
    if isinstance(out, str):
        return None
    found = []
    for t, m in zip(targets, mods_b, strict=True):
        _, d_in, _ = _dims(side_b.types.get(m, ""), out[t].dim())
        pos = _positions(out[t], d_in) if d_in is not None else None
        if pos is None:
            return None
        found.append(pos)
    if any(not torch.equal(p, found[0]) for p in found[1:]):
        return None
    return None if torch.equal(found[0], torch.arange(len(found[0]))) else found[0]


def reorder_of(transform: Any, shape: tuple[int, ...]) -> tuple[int, torch.Tensor | None] | None:
    """``(axis, index)`` where ``transform`` of one tensor of ``shape`` is that tensor with its
    slices along ``axis`` reordered by ``index`` (``None``: left in order), found by running it on
    the tensor's own positions; ``None`` where it does anything else (casts, reshapes, mixes
    axes, joins or splits). Such a transform is compared in place (a gather), not copied."""
    numel = math.prod(shape)
    if not shape or numel == 0 or numel >= 1 << 53:
        return None
    probe = torch.arange(numel, dtype=torch.float64).reshape(shape)
    try:
        out = transform.apply([probe])
    except Exception:  # noqa: BLE001 - a transform that does not run here is copied as before
        return None
    if len(out) != 1 or out[0].dtype != torch.float64 or tuple(out[0].shape) != tuple(shape):
        return None
    got = out[0]
    if torch.equal(got, probe):
        return 0, None
    for axis, size in enumerate(shape):
        stride = numel // math.prod(shape[:axis + 1])
        col = got.movedim(axis, 0).reshape(size, -1)[:, 0]
        index = (col // stride).to(torch.long) % size
        if torch.equal(probe.index_select(axis, index), got):
            return axis, index
    return None


def _run_probe(mapping: Mapping, probes: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor] | str:
    entries = {k: LazyTensor(tuple(t.shape), t.dtype, t.numel() * 4, k, lambda t=t: t) for k, t in probes.items()}
    try:
        mapped = apply_mapping(open_checkpoint(entries), mapping)
        return {t: mapped.checkpoint[t].load() for t in targets}
    except Exception as exc:  # noqa: BLE001 - a project's own transform: no layout, and why
        return f"the transform does not run on an index probe ({type(exc).__name__}: {exc})"[:300]


# --- transformed tensors and statistics ------------------------------------------------------------

@dataclass(frozen=True)
class Gathered:
    """One side of a transformed comparison: parts loaded, joined on ``axis``, then gathered with
    ``index`` (``None``: as joined)."""

    parts: tuple[Any, ...]
    axis: int
    index: torch.Tensor | None = None

    def load(self) -> torch.Tensor:
        x = self._joined()
        return gather(x, self.axis, self.index) if self.index is not None else x

    def load_view(self) -> torch.Tensor | Gather:
        """The parts joined, the gather described, not made (the comparison reads it in place)."""
        x = self._joined()
        return Gather(x, self.axis, self.index) if self.index is not None else x

    def _joined(self) -> torch.Tensor:
        tensors = [p.load() for p in self.parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=self.axis)


def combine_stats(parts: Sequence[TensorStats | None]) -> TensorStats | None:
    """Statistics of parts concatenated (or of one tensor reordered): exact for min, max, mean,
    std, norm and the NaN/Inf counts; no content hash. ``None`` when a part has none.

    Example:
        >>> from tensorparity.checkpoint.tracefolder.records import tensor_stats
        >>> s = combine_stats([tensor_stats(torch.tensor([1.0, 2.0])), tensor_stats(torch.tensor([3.0]))])
        >>> s.mean, s.max, s.hash
        (2.0, 3.0, '')
    """
    if not parts or any(p is None for p in parts):
        return None
    ps = [p for p in parts if p is not None]
    n = [p.numel - p.nan - p.inf for p in ps]
    total_n = sum(n)
    if total_n == 0:
        return replace(ps[0], numel=sum(p.numel for p in ps), nan=sum(p.nan for p in ps), inf=sum(p.inf for p in ps),
                       hash="")
    live = [(k, p) for k, p in zip(n, ps, strict=True) if k]
    total = sum(k * p.mean for k, p in live)
    squares = sum(p.norm * p.norm for _, p in live)
    mean = total / total_n
    std = max(0.0, squares / total_n - mean * mean) ** 0.5
    return TensorStats(sum(p.numel for p in ps), min(p.min for _, p in live), max(p.max for _, p in live), mean, std,
                       squares ** 0.5, sum(p.nan for p in ps), sum(p.inf for p in ps), "")
