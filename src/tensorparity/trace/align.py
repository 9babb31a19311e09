"""Align two traces: which layer of A is which layer of B.

A *layer* is one call of one module: every record with that module path and call number (its
inputs, outputs, gradients and its parameters' gradients). Layers are paired in one of three ways:

- ``name``: same module path and call number (two runs of one implementation).
- ``mapping``: A's module paths are renamed into B's through a
  :class:`~tensorparity.mapping.Mapping` written for parameter keys. A rule such as
  ``layers.{i}.norm1.{p}`` -> ``blocks.{i}.attn_norm.{p}`` names *parameters*; stripping the last
  component where it is a parameter name (a placeholder, or a literal such as ``weight``) gives the
  module rename ``layers.{i}.norm1`` -> ``blocks.{i}.attn_norm``, and cutting both sides after
  their last placeholder gives the parent rename ``layers.{i}`` -> ``blocks.{i}``, which also
  carries the sub-modules no rule names. A rule with several keys on a side (a fused qkv) renames
  no module: its modules are reported as fused, and their parameters' gradients are still
  compared through the rule's transform. Regex rules rename no module.
- ``order``: a sequence alignment over the layers' forward outputs in execution order: only
  outputs of equal shapes and dtypes pair; module class, output statistics and names score the
  candidates (see :mod:`tensorparity.trace._sequence`). O(n·m) with numpy.

``auto`` uses the mapping when one is given, else names when at least 90% of the layers of the
smaller trace have a partner of the same name, else execution order. The whole models (module
``""``) always pair with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from tensorparity.checkpoint.tracefolder.records import TraceRecord
from tensorparity.errors import UsageError
from tensorparity.mapping import Mapping
from tensorparity.mapping.templates import Template
from tensorparity.trace._sequence import align_within_parents, sequence_align

__all__ = ["Alignment", "LayerMatch", "Method", "ModuleRenames", "RecordSource", "TraceLayer", "Unaligned",
           "align_layers", "group_layers", "module_renames"]

Method = Literal["auto", "name", "mapping", "order"]
METHODS = ("auto", "name", "mapping", "order")
FORWARD_KINDS = ("output", "model_output")
NAME_SHARE = 0.9  # auto: align by name when this share of the smaller trace's layers has a namesake
# Literal last components that name a parameter or buffer, not a module.
PARAM_NAMES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "in_proj_weight",
                         "in_proj_bias", "inv_freq", "scale", "gamma", "beta", "embeddings"})


@runtime_checkable
class RecordSource(Protocol):
    """What comparing needs of a trace: its records, its provenance, and each stored tensor.

    :class:`tensorparity.trace.Trace` satisfies it; so does any object with these three members.
    """

    @property
    def records(self) -> Sequence[TraceRecord]: ...

    @property
    def provenance(self) -> dict[str, Any]: ...

    def load(self, record: TraceRecord) -> torch.Tensor: ...


@dataclass(frozen=True)
class TraceLayer:
    """One call of one module and all its records, in execution order.

    Attributes:
        module, call, module_type: as recorded.
        records: every record of this call (inputs, outputs, gradients, parameter gradients).
        order: its place in the forward pass: the index of its first output record (for layers
            without forward outputs, of its first record).
    """

    module: str
    call: int
    module_type: str
    records: tuple[TraceRecord, ...]
    order: int

    @property
    def name(self) -> str:
        """``module`` or ``module#call`` (``<model>`` for the whole model)."""
        name = self.module or "<model>"
        return name if self.call == 0 else f"{name}#{self.call}"

    @property
    def depth(self) -> int:
        return self.module.count(".") + 1 if self.module else 0

    def of_kind(self, *kinds: str) -> tuple[TraceRecord, ...]:
        """Its tensor records of the given kinds."""
        return tuple(r for r in self.records if r.kind in kinds and r.is_tensor)

    @property
    def outputs(self) -> tuple[TraceRecord, ...]:
        return self.of_kind(*FORWARD_KINDS)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of its first forward output (``None`` without one)."""
        outs = self.outputs
        return outs[0].shape if outs else None

    @property
    def backward_order(self) -> int | None:
        """The index of its first gradient record: its place in the backward pass."""
        idx = [r.index for r in self.records if r.kind in ("grad_output", "grad_input", "param_grad")]
        return min(idx) if idx else None


def group_layers(records: Sequence[TraceRecord]) -> list[TraceLayer]:
    """Group records by ``(module, call)``, in forward execution order.

    Example:
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord
        >>> recs = [TraceRecord(i, m, 0, "torch.nn.Linear", "output", "", (2,), "float32", "cpu", None, False)
        ...         for i, m in enumerate(["b", "a"])]
        >>> [layer.name for layer in group_layers(recs)]
        ['b', 'a']
    """
    groups: dict[tuple[str, int], list[TraceRecord]] = {}
    for r in records:
        if r.kind in ("param", "param_signature"):  # what the layer ran with, not what it did: a module that never ran is no layer
            continue
        groups.setdefault((r.module, r.call), []).append(r)
    layers = []
    for (module, call), recs in groups.items():
        recs.sort(key=lambda r: r.index)
        forward = [r.index for r in recs if r.kind in FORWARD_KINDS]
        types = [r.module_type for r in recs if r.module_type]
        layers.append(TraceLayer(module, call, types[0] if types else "", tuple(recs),
                                 min(forward) if forward else recs[0].index))
    layers.sort(key=lambda layer: (layer.order, layer.module, layer.call))
    return layers


# --- module renames from a parameter-key mapping ---------------------------------------------------

@dataclass(frozen=True)
class _Rename:
    a: Template
    b: Template
    rule: int


@dataclass(frozen=True)
class ModuleRenames:
    """Module renames derived from a mapping's rules (see the module docstring).

    Attributes:
        exact: module template pairs (``layers.{i}.norm1`` -> ``blocks.{i}.attn_norm``).
        subtree: prefix template pairs that also carry sub-modules (``layers.{i}`` -> ``blocks.{i}``).
        fused: A module templates that a multi-key rule fuses, with B's module they go into.
        notes: rules from which no rename could be derived, and why.
    """

    exact: tuple[_Rename, ...]
    subtree: tuple[_Rename, ...]
    fused: tuple[tuple[Template, str, int], ...]
    prefix_a: str = ""
    notes: tuple[str, ...] = ()

    def map(self, module: str) -> tuple[str | None, str]:
        """A's module path in B's names, and how: ``(name, "rules[3]")``; ``(None, why)`` when fused.

        Example:
            >>> from tensorparity.mapping import Rule
            >>> renames = module_renames(Mapping([Rule("layers.{i}.norm1.{p}", "blocks.{i}.attn_norm.{p}")]))
            >>> renames.map("layers.1.norm1"), renames.map("layers.1.ffn.0")
            (('blocks.1.attn_norm', 'rules[0]'), ('blocks.1.ffn.0', 'the parent rename of rules[0]'))
        """
        bare = module[len(self.prefix_a):] if self.prefix_a and module.startswith(self.prefix_a) else module
        for r in self.exact:
            values = r.a.match(bare)
            if values is not None:
                return r.b.format(values), f"rules[{r.rule}]"
        for template, into, rule in self.fused:
            values = template.match(bare)
            if values is not None:
                parts = " + ".join(Template(t).format(values) if t else "<model>" for t in into.split(" + "))
                return None, f"fused by rules[{rule}] into {parts}"
        parts = bare.split(".")
        for k in range(len(parts), 0, -1):
            head = ".".join(parts[:k])
            for r in self.subtree:
                values = r.a.match(head)
                if values is not None:
                    return ".".join([r.b.format(values), *parts[k:]]), f"the parent rename of rules[{r.rule}]"
        return bare, "same name"


def _components(text: str) -> list[str]:
    return text.split(".") if text else []


def _module_of(text: str, param_names: frozenset[str]) -> tuple[str, bool] | None:
    """A parameter-key template's module template, and whether it also names sub-modules."""
    parts = _components(text)
    if not parts:
        return None
    last = parts[-1]
    if last.startswith("{") and last.endswith("}") and last.count("{") == 1:
        return ".".join(parts[:-1]), last.endswith("*}")
    if last in param_names:
        return ".".join(parts[:-1]), False
    return None


def _parent(text: str) -> str | None:
    """``layers.{i}.norm1`` -> ``layers.{i}``: cut after the last placeholder (None without one
    or when nothing follows it)."""
    parts = _components(text)
    last = max((i for i, p in enumerate(parts) if "{" in p), default=-1)
    return ".".join(parts[:last + 1]) if 0 <= last < len(parts) - 1 else None


def module_renames(mapping: Mapping, *, param_names: frozenset[str] | set[str] = frozenset()) -> ModuleRenames:
    """Derive module renames from a parameter-key mapping.

    Args:
        mapping: the mapping from A's parameter keys to B's.
        param_names: literal last components to treat as parameter names, on top of
            :data:`PARAM_NAMES` (the traces' recorded parameter names are passed here).

    Example:
        >>> from importlib.resources import files
        >>> m = Mapping.from_yaml(files("tensorparity.examples") / "reference_to_port.yaml")
        >>> r = module_renames(m)
        >>> r.map("layers.0.self_attn.out_proj")[0], r.map("layers.0.self_attn.q_proj")[1]
        ('blocks.0.proj', 'fused by rules[3] into blocks.0.qkv')
    """
    names = PARAM_NAMES | frozenset(param_names)
    exact: dict[str, _Rename] = {}
    subtree: dict[str, _Rename | None] = {}
    fused: list[tuple[Template, str, int]] = []
    notes: list[str] = []

    def add_subtree(a: str, b: str, rule: int) -> None:
        if a in subtree and (subtree[a] is None or subtree[a].b.text != b):  # type: ignore[union-attr]
            if subtree[a] is not None:
                notes.append(f"rules[{rule}] renames {a!r} differently from rules[{subtree[a].rule}]: "  # type: ignore[union-attr]
                             "that parent is not renamed")
            subtree[a] = None
        elif a not in subtree:
            subtree[a] = _Rename(Template(a), Template(b), rule)

    for i, rule in enumerate(mapping.rules):
        if rule.regex:
            notes.append(f"rules[{i}] is a regular expression: no module rename derived from it")
            continue
        mods_a = [_module_of(t, names) for t in rule.a]
        mods_b = [_module_of(t, names) for t in rule.b]
        if any(m is None for m in mods_a + mods_b):
            continue  # a buffer or a key whose last part is not a parameter name: no module to rename
        pairs = [(ma[0], mb[0], ma[1] or mb[1]) for ma in mods_a for mb in mods_b]  # type: ignore[index]
        if any(Template(a).slots != Template(b).slots if a and b else bool(a) != bool(b) for a, b, _ in pairs):
            notes.append(f"rules[{i}] ({rule.short()}): its module parts hold different placeholders")
            continue
        for a, b, carries in pairs:
            parent_a, parent_b = _parent(a), _parent(b)
            if parent_a and parent_b and Template(parent_a).slots == Template(parent_b).slots:
                add_subtree(parent_a, parent_b, i)
            if not a:
                continue
            if len(rule.a) == 1 and len(rule.b) == 1:
                if carries:
                    add_subtree(a, b, i)
                elif a not in exact:
                    exact[a] = _Rename(Template(a), Template(b), i)
            elif not any(t.text == a for t, _, _ in fused):
                fused.append((Template(a), " + ".join(m[0] for m in mods_b), i))  # type: ignore[index]
    return ModuleRenames(tuple(exact.values()), tuple(r for r in subtree.values() if r is not None), tuple(fused),
                         mapping.prefix_a, tuple(notes))


# --- alignment ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerMatch:
    """A layer of A and its partner in B; ``how``: ``name``, ``mapping``, ``order``, ``mapping+order``
    (a parameter-free module paired by order inside its mapped parent), ``order+name`` (a layer
    without forward output, paired by its path below its paired ancestor) or ``model``."""

    a: TraceLayer
    b: TraceLayer
    how: str
    score: float | None = None
    group_a: tuple[TraceLayer, ...] = ()  # several layers a side: a fused module on the other
    group_b: tuple[TraceLayer, ...] = ()
    layout: Any = None  # a trace._layout.Layout: how A's activations become B's

    @property
    def name_a(self) -> str:
        return " + ".join(x.name for x in self.group_a) if self.group_a else self.a.name

    @property
    def name_b(self) -> str:
        return " + ".join(x.name for x in self.group_b) if self.group_b else self.b.name


@dataclass(frozen=True)
class Unaligned:
    """A layer without a partner, and why."""

    layer: TraceLayer
    reason: str


@dataclass(frozen=True)
class Alignment:
    """Which layer of A is which of B.

    Attributes:
        method: how the layers were paired (``name``, ``mapping`` or ``order``).
        matches: the pairs, in A's forward execution order.
        only_a, only_b: the layers left without a partner, with the reason.
        renames: the module renames used (``mapping``).
        notes: what the reader should know about the alignment.
    """

    method: str
    matches: tuple[LayerMatch, ...]
    only_a: tuple[Unaligned, ...]
    only_b: tuple[Unaligned, ...]
    renames: ModuleRenames | None = None
    notes: tuple[str, ...] = ()


def align_layers(a: Sequence[TraceRecord], b: Sequence[TraceRecord], *, mapping: Mapping | None = None,
                 method: Method = "auto") -> Alignment:
    """Pair the layers of two traces' records (see the module docstring for the methods).

    Example:
        >>> from tensorparity.checkpoint.tracefolder.records import TraceRecord
        >>> def rec(i, m, t):
        ...     return TraceRecord(i, m, 0, t, "output", "", (2, 4), "float32", "cpu", None, False)
        >>> a = [rec(0, "enc.norm", "LayerNorm"), rec(1, "enc.fc", "Linear")]
        >>> b = [rec(0, "body.ln", "LayerNorm"), rec(1, "body.proj", "Linear")]
        >>> [(m.a.name, m.b.name) for m in align_layers(a, b).matches]
        [('enc.norm', 'body.ln'), ('enc.fc', 'body.proj')]
    """
    if method not in METHODS:
        raise UsageError(f"align={method!r} is not one of {', '.join(METHODS)}",
                         fix="pass align='auto', 'name', 'mapping' or 'order'")
    if method == "mapping" and mapping is None:
        raise UsageError("align='mapping' needs a mapping", fix="pass mapping=... (or --map MAP.yaml)")
    layers_a, layers_b = group_layers(a), group_layers(b)
    if method == "auto":
        method = "mapping" if mapping is not None else ("name" if _name_share(layers_a, layers_b) >= NAME_SHARE
                                                         else "order")
    if method == "order":
        return _by_order(layers_a, layers_b)
    renames = None
    if method == "mapping":
        assert mapping is not None
        params = {r.path for r in (*a, *b) if r.kind == "param_grad"}
        renames = module_renames(mapping, param_names=params)
    return _by_name(layers_a, layers_b, renames, mapping.prefix_b if mapping else "")


def _name_share(a: list[TraceLayer], b: list[TraceLayer]) -> float:
    names_a, names_b = {(x.module, x.call) for x in a}, {(x.module, x.call) for x in b}
    return len(names_a & names_b) / max(1, min(len(names_a), len(names_b)))


def _by_name(a: list[TraceLayer], b: list[TraceLayer], renames: ModuleRenames | None, prefix_b: str) -> Alignment:
    index = {(x.module, x.call): x for x in b}
    taken: dict[tuple[str, int], TraceLayer] = {}
    matches, only_a = [], []
    how = "mapping" if renames else "name"
    for layer in a:
        target, why = (renames.map(layer.module) if renames else (layer.module, "same name"))
        if not layer.module:
            target = ""
        if target is None:
            only_a.append(Unaligned(layer, why))
            continue
        keys = [(target, layer.call)] + ([(prefix_b + target, layer.call)] if prefix_b else [])
        key = next((k for k in keys if k in index), None)
        if key is None:
            only_a.append(Unaligned(layer, f"B has no layer {_layer_name(target, layer.call)}"
                                           + (f" (name from {why})" if why != "same name" else "")))
        elif key in taken:
            only_a.append(Unaligned(layer, f"B's {_layer_name(*key)} is already paired with A's {taken[key].name}"))
        else:
            taken[key] = layer
            matches.append(LayerMatch(layer, index[key], "model" if not layer.module else how))
    left_b = [x for x in b if (x.module, x.call) not in taken]
    if renames:
        # Parameter-free modules (activations, dropouts, wrappers of fused projections) have no
        # rule: pair them by execution order inside their already-paired parents.
        left_a = [u.layer for u in only_a if not u.reason.startswith("fused")]
        extra = align_within_parents([(m.a, m.b) for m in matches], left_a, left_b)
        done_a = {id(x) for x, _, _ in extra}
        done_b = {id(y) for _, y, _ in extra}
        matches += [LayerMatch(x, y, "mapping+order", score) for x, y, score in extra]
        matches.sort(key=lambda m: m.a.order)
        only_a = [u for u in only_a if id(u.layer) not in done_a]
        left_b = [x for x in left_b if id(x) not in done_b]
    only_b = [Unaligned(x, "no layer of A maps to it" if renames else "A has no layer of this name") for x in left_b]
    notes = renames.notes if renames else ()
    return Alignment(how, tuple(matches), tuple(only_a), tuple(only_b), renames, notes)


def _layer_name(module: str, call: int) -> str:
    name = module or "<model>"
    return name if call == 0 else f"{name}#{call}"


def _by_order(a: list[TraceLayer], b: list[TraceLayer]) -> Alignment:
    roots_a = {x.call: x for x in a if not x.module}
    roots_b = {x.call: x for x in b if not x.module}
    seq_a = [x for x in a if x.module and x.outputs]
    seq_b = [x for x in b if x.module and x.outputs]
    pairs = sequence_align(seq_a, seq_b)
    matches = [LayerMatch(seq_a[i], seq_b[j], "order", score) for i, j, score in pairs]
    matches += [LayerMatch(roots_a[c], roots_b[c], "model") for c in sorted(roots_a.keys() & roots_b.keys())]
    matches.sort(key=lambda m: m.a.order)
    paired_a = {(m.a.module, m.a.call) for m in matches}
    paired_b = {(m.b.module, m.b.call) for m in matches}

    matches += _by_parent(matches, [x for x in a if (x.module, x.call) not in paired_a and not x.outputs],
                          [x for x in b if (x.module, x.call) not in paired_b and not x.outputs])
    paired_a = {(m.a.module, m.a.call) for m in matches}
    paired_b = {(m.b.module, m.b.call) for m in matches}

    def reason(x: TraceLayer, other: str) -> str:
        if not x.outputs:
            return "no forward output recorded to align it by"
        return f"no partner in {other} at its place in execution order"

    only_a = tuple(Unaligned(x, reason(x, "B")) for x in a if (x.module, x.call) not in paired_a)
    only_b = tuple(Unaligned(x, reason(x, "A")) for x in b if (x.module, x.call) not in paired_b)
    return Alignment("order", tuple(matches), only_a, only_b)


def _by_parent(matches: list[LayerMatch], left_a: list[TraceLayer], left_b: list[TraceLayer]) -> list[LayerMatch]:
    """Layers without a forward output (a module never called whose weight its parent uses, as
    MultiheadAttention uses ``out_proj``'s): paired through their nearest paired ancestor, by the
    path below it (``enc.attn.out_proj`` under ``enc.attn`` <-> ``body.attn`` + ``.out_proj``)."""
    anchors = {m.a.module: m.b.module for m in matches if m.a.call == 0 and m.b.call == 0}
    index_b = {(x.module, x.call): x for x in left_b}
    found = []
    for layer in left_a:
        parts = layer.module.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            head = ".".join(parts[:cut])
            if head in anchors:
                tail = ".".join(parts[cut:])
                target = f"{anchors[head]}.{tail}" if anchors[head] else tail
                partner = index_b.pop((target, layer.call), None)
                if partner is not None:
                    found.append(LayerMatch(layer, partner, "order+name"))
                break
    return found
