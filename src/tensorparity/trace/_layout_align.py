"""Alignment through layouts: the layers of a layout's group paired as one (a fused module with its
parts, call by call), and a module holding a packed weight paired with the parts' parent (see
:mod:`._layout`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensorparity.trace._layout import Layout
from tensorparity.trace.align import Alignment, LayerMatch, Unaligned

__all__ = ["apply_layouts"]


def apply_layouts(alignment: Alignment, layouts: Sequence[Layout], layers_a: Sequence[Any],
                  layers_b: Sequence[Any], prefix_b: str = "") -> Alignment:
    """The alignment with every layout's layers paired as one group (call by call) and the layout
    attached; whatever those layers were paired with before is released."""
    by_a = {(x.module, x.call): x for x in layers_a}
    by_b = {(x.module, x.call): x for x in layers_b}
    usable = [x for x in layouts if x.problem is None]
    alignment = _packed(alignment, [x for x in layouts if x.problem is not None], by_a, by_b, prefix_b)
    if not usable:
        return alignment
    new: list[LayerMatch] = []
    for layout in usable:
        for call in sorted({x.call for x in layers_a if x.module == layout.a[0]}):
            ga = [by_a.get((m, call)) for m in layout.a]
            gb = [by_b.get((m, call)) or by_b.get((prefix_b + m, call)) for m in layout.b]
            if all(x is not None for x in ga + gb):
                new.append(LayerMatch(ga[0], gb[0], "mapping", None, tuple(ga) if len(ga) > 1 else (),
                                      tuple(gb) if len(gb) > 1 else (), layout))
    taken_a = {(x.module, x.call) for m in new for x in (m.group_a or (m.a,))}
    taken_b = {(x.module, x.call) for m in new for x in (m.group_b or (m.b,))}
    kept, released_a, released_b = [], [], []
    for m in alignment.matches:
        if (m.a.module, m.a.call) in taken_a or (m.b.module, m.b.call) in taken_b:
            if (m.a.module, m.a.call) not in taken_a:
                released_a.append(Unaligned(m.a, f"its partner {m.b.name} is paired through a mapping layout"))
            if (m.b.module, m.b.call) not in taken_b:
                released_b.append(Unaligned(m.b, f"its partner {m.a.name} is paired through a mapping layout"))
            continue
        kept.append(m)
    only_a = [u for u in alignment.only_a if (u.layer.module, u.layer.call) not in taken_a] + released_a
    only_b = [u for u in alignment.only_b if (u.layer.module, u.layer.call) not in taken_b] + released_b
    matches = sorted(kept + new, key=lambda m: m.a.order)
    return Alignment(alignment.method, tuple(matches), tuple(only_a), tuple(only_b), alignment.renames,
                     alignment.notes)


def _common_parent(modules: Sequence[str]) -> str | None:
    parents = {m.rpartition(".")[0] for m in modules}
    return parents.pop() if len(parents) == 1 else None


def _packed(alignment: Alignment, layouts: Sequence[Layout], by_a: dict[Any, Any], by_b: dict[Any, Any],
            prefix_b: str) -> Alignment:
    """A weight packed inside one module (``nn.MultiheadAttention``'s ``in_proj_weight``) that a rule
    splits into the weights of several modules on the other side: no layout follows, but the
    module holding it is the partner of the modules' common parent (the attention of the other
    implementation). Pairs them where both are still unpaired and their outputs agree in shape."""
    only_a = {(u.layer.module, u.layer.call): u for u in alignment.only_a}
    only_b = {(u.layer.module, u.layer.call): u for u in alignment.only_b}
    new = []
    for layout in layouts:
        if len(layout.a) == 1 and len(layout.b) > 1:
            pa, pb = layout.a[0], _common_parent(layout.b)
        elif len(layout.a) > 1 and len(layout.b) == 1:
            pa, pb = _common_parent(layout.a), layout.b[0]
        else:
            continue
        if pa is None or pb is None:
            continue
        for (module, call), u in list(only_a.items()):
            if module != pa:
                continue
            key_b = next((k for k in ((pb, call), (prefix_b + pb, call)) if k in only_b), None)
            if key_b is None or u.layer.shape != only_b[key_b].layer.shape:
                continue
            new.append(LayerMatch(u.layer, only_b.pop(key_b).layer, "mapping"))
            del only_a[(module, call)]
    if not new:
        return alignment
    matches = sorted([*alignment.matches, *new], key=lambda m: m.a.order)
    return Alignment(alignment.method, tuple(matches), tuple(only_a.values()), tuple(only_b.values()),
                     alignment.renames, alignment.notes)
