"""Formatting helpers every report shares: safe one-line reprs, human sizes, JSON-ready values,
rich tables and plain-text rendering, HTML tables.

Keys and values come from untrusted files, so everything that reaches a terminal goes through
:func:`printable` (a raw escape sequence would be interpreted by the user's terminal).
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import reprlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tensorparity.report._fit import FitTable, Wrapped, column_kind

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from tensorparity.numerics import TensorComparison
    from tensorparity.report._fit import FitTable

__all__ = ["comparison_lines", "distinct", "dtype_cell", "fold_count", "header_rows", "html_comparisons", "html_style",
           "html_table", "human_bytes", "human_count", "jsonable", "key_cell", "needs_cell", "nonfinite_cell", "num",
           "plain_text", "plural", "printable", "provenance_items", "record_dict", "rich_comparisons", "rich_header",
           "rich_table", "rich_titled_table", "short_repr", "wrapped"]

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def printable(text: str) -> str:
    """Escape control characters so that untrusted text cannot drive the terminal.

    Example:
        >>> printable("a\\x1b[31mb")
        'a\\\\x1b[31mb'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def short_repr(value: Any, limit: int = 80) -> str:
    """A one-line, bounded, printable repr of a checkpoint value.

    Example:
        >>> short_repr(list(range(100)))
        '[0, 1, 2, 3, 4, 5, ...]'
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value's repr must never break the report
        text = f"<{type(value).__name__}>"
    text = printable(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Example:
        >>> human_bytes(1536)
        '1.5 KiB'
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """``1_234_567`` -> ``'1.2M'``.

    Example:
        >>> human_count(1_234_567)
        '1.2M'
    """
    for div, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def fold_count(shown: int, total: int, hint: str = "") -> str:
    """The line that closes a folded list: ``'… and 140 more'`` (plus a hint where to see them).

    Example:
        >>> fold_count(10, 150, "--json lists them")
        '… and 140 more (--json lists them)'
    """
    return f"… and {total - shown:,} more" + (f" ({hint})" if hint else "")


def provenance_items(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """Provenance as short (name, text) pairs; big structures (a NeMo config) are summarised.

    Example:
        >>> provenance_items({"epoch": 3})
        [('epoch', '3')]
    """
    out = []
    for name, value in provenance.items():
        if isinstance(value, str):
            text = printable(value if len(value) <= 80 else value[:79] + "…")
        elif isinstance(value, dict) and len(short_repr(value, 200)) > 80:
            text = f"{{{len(value)} keys}} (see --json)"
        else:
            text = short_repr(value)
        out.append((printable(str(name)), text))
    return out


_PROVENANCE_FIRST = ("framework", "framework_version", "model_class", "epoch", "global_step", "step", "iteration")


def header_rows(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """Provenance as a report header shows it: framework and version on one row, then epoch and
    step, then the rest in the checkpoint's order.

    Example:
        >>> header_rows({"epoch": 2, "framework": "lightning", "framework_version": "2.4.0"})
        [('framework', 'lightning 2.4.0'), ('epoch', '2')]
    """
    prov = dict(sorted(provenance_items(provenance),
                       key=lambda kv: _PROVENANCE_FIRST.index(kv[0]) if kv[0] in _PROVENANCE_FIRST else 99))
    rows = []
    if "framework" in prov:
        version = prov.pop("framework_version", "")
        rows.append(("framework", f"{prov.pop('framework')} {version}".strip()))
    return rows + list(prov.items())


def jsonable(value: Any, depth: int = 0) -> Any:
    """Plain data for strict JSON: non-finite floats become strings, unknown objects short reprs.

    Example:
        >>> jsonable({"clip": float("inf"), "betas": (0.9, 0.99)})
        {'clip': 'inf', 'betas': [0.9, 0.99]}
    """
    if depth > 50:
        return short_repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    return short_repr(value)


def rich_table(title: str, *columns: str, left: tuple[str, ...] = ("key", "shape", "dtype")) -> FitTable:
    """The compact table every report uses: bold title on the left, no outer box; the first
    column and the ``left`` ones are left-aligned, numbers right-aligned.

    It fits any width (:class:`~tensorparity.report._fit.FitTable`): number, shape and dtype
    columns never wrap, names wrap only between their dotted components, and a table too wide
    for the console is shown one row at a time, as ``column: value`` lines."""
    kinds = [column_kind(i, c, left) for i, c in enumerate(columns)]
    justify = ["left" if i == 0 or c in left else "right" for i, c in enumerate(columns)]
    return FitTable(title, columns, kinds, justify)


def wrapped(text: str | Text, style: str = "", *, indent: int = 0) -> RenderableType:
    """Text that wraps only between words, after ``/`` and between a key's dotted components:
    never inside a number (``0.0007813``) or a component (``self_attn``); ``indent`` spaces
    before each line."""
    return Wrapped(text, style, indent=indent)


def plain_text(renderable: RenderableType, *, width: int = 100) -> str:
    """Render to plain text (no colours, no terminal codes): what ``str(report)`` returns."""
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def rich_header(rows: Sequence[tuple[str, str]]) -> RenderableType:
    """A report's header: bold names, their values beside them."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    for name, text in rows:
        grid.add_row(Text(name, style="bold"), wrapped(text))
    return grid


def record_dict(record: Any) -> dict[str, Any]:
    """A dataclass record's fields, shallow (nested records keep their own ``to_dict``), tuples as lists.

    Example:
        >>> import dataclasses
        >>> record_dict(dataclasses.make_dataclass("R", ["keys"])(("a", "b")))
        {'keys': ['a', 'b']}
    """
    return {f.name: list(v) if isinstance(v := getattr(record, f.name), tuple) else v
            for f in dataclasses.fields(record)}


def html_style(css_class: str) -> str:
    """One scoped style block for a report's HTML (no scripts, nothing outside ``css_class``)."""
    c = f".{css_class}"
    return (f"<style>{c}{{font-family:ui-monospace,monospace;font-size:12px}}"
            f"{c} table{{border-collapse:collapse;margin:2px 0 8px}}"
            f"{c} th,{c} td{{text-align:left;padding:1px 10px 1px 0}}"
            f"{c} ul{{margin:0;padding-left:1.4em;list-style:none}}{c} .d{{color:#888}}"
            f"{c} .ok{{color:#080;font-weight:bold}}{c} .bad{{color:#c00;font-weight:bold}}"
            f"{c} .m{{padding-left:1.4em;margin-bottom:4px}}</style>")


def html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A titled HTML table; every cell is escaped."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<b>{e(title)}</b><table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------------------------------------
# Cells for comparison records: every report that lists TensorComparisons (diff, trace compare,
# load checks, resume checks) shows them the same way.


def num(x: Any) -> str:
    """A number in 4 significant digits; anything else as ``str``.

    Example:
        >>> num(0.000123456), num(3)
        ('0.0001235', '3')
    """
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def distinct(a: Any, b: Any) -> tuple[str, str]:
    """Two numbers with as many digits as it takes to tell them apart (4, then up to 17).

    Example:
        >>> distinct(0.1234567, 0.1234568)
        ('0.1234567', '0.1234568')
    """
    if isinstance(a, float) and isinstance(b, float):
        for digits in (4, 6, 9, 17):
            text_a, text_b = f"{a:.{digits}g}", f"{b:.{digits}g}"
            if text_a != text_b:
                return text_a, text_b
    return num(a), num(b)


def key_cell(t: TensorComparison) -> str:
    """``key``, or ``key → key_b`` when a mapping renamed it."""
    return printable(t.key if not t.key_b or t.key_b == t.key else f"{t.key} → {t.key_b}")


def dtype_cell(t: TensorComparison) -> str:
    """``float32``, or ``bfloat16 → float32`` when the dtypes differ."""
    return t.dtype_a if not t.dtype_differs else f"{t.dtype_a} → {t.dtype_b}"


def nonfinite_cell(t: TensorComparison) -> str:
    """NaN/Inf counts of both sides and whether their positions agree; empty when there are none."""
    parts = []
    for name, na, nb, agree in (("NaN", t.nan_a, t.nan_b, t.nan_agree), ("Inf", t.inf_a, t.inf_b, t.inf_agree)):
        if na or nb:
            parts.append(f"{name} {na:,} vs {nb:,}, {'same places' if agree else 'different places'}")
    return "; ".join(parts)


def needs_cell(t: TensorComparison) -> str:
    """The smallest tolerance that would have passed, each bound at the other's value:
    ``atol ≥ 0.5 (at rtol=1.3e-06) or rtol ≥ 0.25 (at atol=1e-05)``."""
    tol = t.tolerance
    if t.status == "shape":
        return "none (shapes differ)"
    if not (t.nan_agree and t.inf_agree):
        return "none (NaN/Inf places differ)"
    if t.max_abs == 0 and (tol.equal_nan or not t.nan_a):
        return "any non-exact tolerance (equal values)" if tol.exact else "zero tolerance (equal values)"
    if not tol.equal_nan and t.nan_a:
        return "equal_nan (NaNs in the same places)"
    if tol.exact and t.required_atol <= tol.atol:
        return f"any non-exact tolerance, e.g. atol={tol.atol:g}, rtol={tol.rtol:g}"
    return (f"atol ≥ {num(t.required_atol)} (at rtol={tol.rtol:g}) or rtol ≥ {num(t.required_rtol)} "
            f"(at atol={tol.atol:g})")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "key")`` -> ``'1 key'``; ``plural(3, "key")`` -> ``'3 keys'``.

    Example:
        >>> plural(2, "tensor"), plural(1, "mismatch", "mismatches")
        ('2 tensors', '1 mismatch')
    """
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def comparison_lines(t: TensorComparison, origin: Sequence[str] = ()) -> list[str]:
    """One comparison as lines: what it is (and, through a mapping, the ``origin`` keys of A it was
    made from); how many elements fail; by how much; where first and what tolerance would pass.
    The first line is the heading.

    Example:
        >>> import torch
        >>> from tensorparity.numerics import compare_tensors
        >>> comparison_lines(compare_tensors("w", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])))[-1]
        'first at [1]: A 2 vs B 2.5 · passes with atol ≥ 0.5 (at rtol=1.3e-06) or rtol ≥ 0.2 (at atol=1e-05)'
    """
    first_a, first_b = distinct(t.first_a, t.first_b)
    where = f"first at {list(t.first_index)}: A {first_a} vs B {first_b}" if t.first_index else ""
    made = [f"made from A's {', '.join(printable(k) for k in origin[:4])}"
            + (f" and {len(origin) - 4} more" if len(origin) > 4 else "")] if origin else []
    return [f"{key_cell(t)}  {list(t.shape_a)} {dtype_cell(t)}", *made,
            f"{t.n_mismatch:,} of {plural(t.numel, 'element')} ({t.frac_mismatch:.2%}) outside "
            f"{t.tolerance.describe()}",
            f"max abs {num(t.max_abs)} · max rel {num(t.max_rel)} · mean abs {num(t.mean_abs)} · "
            f"cosine {t.cosine:.6f}",
            " · ".join(x for x in (where, nonfinite_cell(t), f"passes with {needs_cell(t)}") if x)]


def rich_comparisons(title: str, records: Sequence[TensorComparison], *, top: int, hint: str,
                     origins: dict[str, tuple[str, ...]] | None = None) -> list[RenderableType]:
    """Comparison records as blocks of :func:`comparison_lines` under a bold title, the first ``top``."""
    from rich.text import Text

    parts: list[RenderableType] = [Text(f"{title} ({len(records):,})", style="bold")]
    for t in records[:top]:
        first, *rest = comparison_lines(t, (origins or {}).get(t.key, ()))
        parts += [wrapped(first, "bold red"), *(wrapped(line, indent=2) for line in rest)]
    if len(records) > top:
        parts.append(Text(fold_count(top, len(records), hint), style="dim italic"))
    return parts


def html_comparisons(title: str, records: Sequence[TensorComparison], *, top: int, hint: str,
                     origins: dict[str, tuple[str, ...]] | None = None) -> str:
    """The HTML of :func:`rich_comparisons` (classes ``bad``, ``m`` and ``d`` for the report's style)."""
    e = html.escape
    parts = [f"<b>{e(title)} ({len(records):,})</b>"]
    for t in records[:top]:
        first, *rest = (e(line) for line in comparison_lines(t, (origins or {}).get(t.key, ())))
        parts.append(f"<div class='bad'>{first}</div><div class='m'>{'<br>'.join(rest)}</div>")
    if len(records) > top:
        parts.append(f"<div class='d'>{e(fold_count(top, len(records), hint))}</div>")
    return "".join(parts)


def rich_titled_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, total: int | None = None,
                      hint: str = "", left: tuple[str, ...] = ("key", "shape", "dtype")) -> list[RenderableType]:
    """A bold title, a :func:`rich_table` under it (rich would wrap a title inside the table to the
    table's width) and, when ``total`` exceeds the rows shown, the fold line."""
    from rich.text import Text

    table = rich_table("", *columns, left=left)
    for row in rows:
        table.add_row(*row)
    parts: list[RenderableType] = [Text(title, style="bold"), table]
    if total is not None and total > len(rows):
        parts.append(Text(fold_count(len(rows), total, hint), style="dim italic"))
    return parts
