"""The terminal rendering of a :class:`~tensorparity.trace._trace_report.TraceReport`: header and
warnings, the verdict, the classic line, the first divergence, then the mismatched layers, the
matched ones, parameter gradients and the layers of only one side, each folded to ``top`` rows."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tensorparity.report._render import (
    comparison_lines,
    dtype_cell,
    fold_count,
    header_rows,
    key_cell,
    needs_cell,
    num,
    plural,
    printable,
    rich_header,
    rich_titled_table,
    wrapped,
)

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from tensorparity.numerics import TensorComparison
    from tensorparity.trace._trace_report import LayerComparison, TraceReport, TraceSide

__all__ = ["rich_parts"]

_STYLE = {"identical": "bold green", "close": "bold green", "differs": "bold red", "inputs differ": "bold red",
          "nothing compared": "bold red"}
_HINT = "--top N shows more, --json lists all"


def _short(module_type: str) -> str:
    """``torch.nn.modules.linear.Linear`` -> ``Linear``."""
    return printable(module_type.rsplit(".", 1)[-1])


def _side_line(side: TraceSide) -> str:
    model = f", {printable(side.model_class)}" if side.model_class else ""
    return (f"{printable(side.source)}  ({side.mode}, {plural(side.layers, 'layer')}, "
            f"{plural(side.records, 'record')}{model})")


def _header(r: TraceReport) -> list[tuple[str, str]]:
    rows = [("A", _side_line(r.a)), ("B", _side_line(r.b)), ("aligned by", r.alignment)]
    if r.mapping:
        rows[-1] = ("aligned by", f"mapping {printable(r.mapping)}")
    rows.append(("tolerance", r.tolerance.describe()))
    same = {k: v for k, v in r.a.provenance.items()
            if v is not None and r.b.provenance.get(k) == v and k in ("seed", "dtype", "device")}
    rows += header_rows(same)
    return rows


def _mark(passed: bool | None) -> str:
    return "-" if passed is None else ("ok" if passed else "DIFF")


def _origin_cell(x: LayerComparison, first: LayerComparison | None) -> str:
    """``introduced``, ``inherited`` (from the first divergence), ``inherited ← layer``, or for a
    layer that differs in layout only, ``layout only (healed at X)``."""
    if x.healed and x.origin is None:
        return f"layout only ({printable(x.healed_how)})"
    if x.origin is None:
        return ""
    if x.origin == "inherited" and x.inherited_from and (first is None or x.inherited_from != first.layer_a):
        return f"inherited ← {printable(x.inherited_from)}"
    return x.origin


def _rel(x: float) -> str:
    return "∞" if math.isinf(x) else num(float(x))


def _row(x: LayerComparison, first: LayerComparison | None = None) -> list[str]:
    shape = str(list(x.shape)) if x.shape is not None else ""
    return [str(x.order), x.label, _mark(x.forward_passed), _mark(x.backward_passed), num(x.max_abs), shape,
            _origin_cell(x, first)]


_COLUMNS = ["#", "layer", "fwd", "bwd", "max abs", "shape", "origin"]
_LEFT = ("layer", "shape", "origin", "fwd", "bwd")


def _first_lines(r: TraceReport) -> list[str]:
    x = r.first_divergence
    if x is None:
        return []
    head = (f"First divergence ({x.direction}): {x.label}  ({_short(x.type_a)}"
            + (f" → {_short(x.type_b)}" if x.type_b != x.type_a else "") + ")")
    if x.direction == "forward":
        what = (f"its outputs differ by {_rel(x.error)} (relative error) where what it received differs by "
                f"{_rel(x.input_error)}")
    else:
        inp = "not recorded" if x.backward_input_error is None else _rel(x.backward_input_error)
        what = (f"its gradients w.r.t. input and parameters differ by {_rel(x.backward_error)} (relative error) "
                f"where its gradient w.r.t. output differs by {inp}")
    child = r.mismatched[0]
    if child is not x and x.direction == "forward":
        # Pinned on the parent: a sub-layer received an error that nothing inside made.
        inside = x.layer_a.replace("<model>", "")
        lonely = [u for u in r.only_a if u.layer.startswith(inside) and not u.reason.startswith("fused")]
        extra = ("; A's " + ", ".join(f"{printable(u.layer)} ({_short(u.module_type)})" for u in lonely[:3])
                 + " ran in there without a partner in B") if lonely else ""
        return [head, f"its sub-layer {printable(child.label)} received inputs that differ by {_rel(child.input_error)} "
                      f"although nothing that ran before it differs: the error is made by this layer's own code "
                      f"between its sub-layers{extra}"]
    if x.origin == "introduced":
        verdict = "the error is introduced here"
    elif x.inherited_from:
        verdict = f"inherited from {printable(x.inherited_from)}"
    elif x.direction == "backward":
        verdict = ("inherited: the gradient arrived wrong from the layer that used its output, whose gradients "
                   "w.r.t. inputs were not recorded (capture with inputs=True)")
    else:
        verdict = "inherited"
    lines = [head, f"{what}: {verdict}"]
    return lines


def _worst_lines(x: LayerComparison) -> list[str]:
    """The deciding comparison's lines; by statistics there are no elements to count."""
    t = x.worst
    if t is None:
        return []
    if t.key not in x.by_stats:
        return comparison_lines(t)
    return [f"{key_cell(t)}  {list(t.shape_a)} {dtype_cell(t)}",
            f"compared by statistics (a side stored no tensor): min/max/mean/std/norm and NaN/Inf counts differ by "
            f"up to {num(t.max_abs)}, outside {t.tolerance.describe()}", f"passes with {needs_cell(t)}"]


def rich_parts(r: TraceReport, *, top: int) -> tuple[list[RenderableType], Text, list[RenderableType]]:
    from rich.text import Text

    head: list[RenderableType] = [rich_header(_header(r)), Text()]
    for w in r.warnings:
        head.append(wrapped(f"WARNING: {printable(w)}", "bold red"))
    head += [Text()] if r.warnings else []
    head.append(wrapped(r.summary()))
    body: list[RenderableType] = [Text()]
    first = r.first_divergence
    if first is not None:
        lines = _first_lines(r)
        body.append(wrapped(lines[0], "bold red"))
        body += [wrapped(line, indent=2) for line in (*lines[1:], *_worst_lines(first))]
        body.append(Text())
    bad = r.mismatched
    if bad:
        title = f"Mismatched layers, in execution order ({len(bad):,})"
        if any(x.origin == "inherited" and x.inherited_from == first.layer_a for x in bad if first is not None):
            title += f"; inherited: from {printable(first.layer_a)} unless named"  # type: ignore[union-attr]
        body += rich_titled_table(title, _COLUMNS, [_row(x, first) for x in bad[:top]], total=len(bad), hint=_HINT,
                                  left=_LEFT)
        body.append(Text())
    if r.healed:
        rows = [[str(x.order), x.label, "/".join(x.healed_directions), num(x.max_abs), printable(x.healed_how)]
                for x in r.healed[:top]]
        body += rich_titled_table(f"Healed layers: differ in layout only, not in value ({len(r.healed):,})",
                                  ["#", "layer", "where", "max abs", "why"], rows, total=len(r.healed),
                                  hint=_HINT, left=("layer", "where", "why"))
        body.append(Text())
    laid = [x for x in r.layers if x.layout or x.layout_notes]
    if laid:
        rows = [[x.label, printable("; ".join(((x.layout,) if x.layout else ()) + x.layout_notes))]
                for x in laid[:top]]
        body += rich_titled_table(f"Layers compared through a layout derived from the mapping ({len(laid):,})",
                                  ["layer", "what was done to A's activations"], rows, total=len(laid), hint=_HINT,
                                  left=("layer", "what was done to A's activations"))
        body.append(Text())
    good = r.matched
    if good:
        body += rich_titled_table(f"Matched layers ({len(good):,})", _COLUMNS[:-1],
                                  [_row(x)[:-1] for x in good[:top]], total=len(good), hint=_HINT, left=_LEFT)
        body.append(Text())
    bad_params = sorted((t for t in r.params if not t.passed), key=lambda t: (-t.frac_mismatch, -t.max_abs))
    if bad_params:
        body += rich_titled_table(f"Parameter gradients outside tolerance ({len(bad_params):,})",
                                  ["parameter", "max abs", "max rel", "shape"],
                                  [[_param_name(t), num(t.max_abs), num(t.max_rel), str(list(t.shape_a))]
                                   for t in bad_params[:top]], total=len(bad_params), hint=_HINT, left=("parameter",))
        body.append(Text())
    for title, items in (("Only in A", r.only_a), ("Only in B", r.only_b)):
        if items:
            rows = [[printable(u.layer), _short(u.module_type),
                     str(list(u.shape)) if u.shape is not None else "", printable(u.reason)] for u in items[:top]]
            body += rich_titled_table(f"{title} ({len(items):,})", ["layer", "type", "shape", "why"], rows,
                                      total=len(items), hint=_HINT, left=("layer", "type", "shape", "why"))
            body.append(Text())
    for side, names in (("A", r.params_only_a), ("B", r.params_only_b)):
        if names:
            shown = ", ".join(printable(n) for n in names[:top])
            more = f" {fold_count(top, len(names), _HINT)}" if len(names) > top else ""
            body += [wrapped(f"Parameter gradients only in {side} ({len(names):,}): {shown}{more}"), Text()]
    for note in r.notes:
        body.append(wrapped(f"note: {printable(note)}", "dim"))
    return head, Text(r.classic_summary(), style=_STYLE[r.verdict]), body


def _param_name(t: TensorComparison) -> str:
    """``layers.0.norm1.weight`` from the record key ``layers.0.norm1/0/param_grad/weight``."""
    def name(key: str) -> str:
        parts = key.split("/")
        return ".".join(p for p in (parts[0], parts[-1]) if p and p != "<model>") if len(parts) >= 4 else key

    a = " + ".join(name(k) for k in t.key.split(" + "))
    b = name(t.key_b) if t.key_b else a
    return printable(a if a == b else f"{a} → {b}")
