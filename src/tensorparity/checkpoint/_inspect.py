"""What a checkpoint holds, at a glance: :func:`inspect` and its :class:`InspectReport`.

The report is built from metadata alone (shapes, dtypes, byte sizes, values): no tensor is ever
loaded, so inspecting a multi-GB checkpoint costs about as much as opening it. The record renders
for people (rich, in the terminal; HTML, in a notebook) and for machines (JSON, schema
``tensorparity.inspect/1``).
"""

from __future__ import annotations

import html
import math
import re
import sys
from dataclasses import dataclass, field
from functools import partialmethod
from typing import TYPE_CHECKING, Any

from tensorparity.checkpoint import Checkpoint, PlaceholderInfo, TensorEntry, ValueEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint._roles import Counts, buffer_keys, entry_counts, module_counts
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.errors import UsageError
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._keytree import Node as _Node  # noqa: F401 - re-exported for older imports
from tensorparity.report._keytree import html_tree, rich_tree
from tensorparity.report._keytree import key_tree as _key_tree
from tensorparity.report._render import (  # noqa: F401
    header_rows,
    html_table,
    human_bytes,
    human_count,
    jsonable,
    printable,
    provenance_items,
    rich_table,
    short_repr,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "DtypeSummary", "InspectReport", "KeyInfo", "NotExecuted", "SectionSummary", "inspect",
           "render_html"]

SCHEMA = "tensorparity.inspect/1"
MAX_PLACEHOLDERS_SHOWN = 30

@dataclass(frozen=True)
class SectionSummary:
    """Counts for one section (``model``, ``optimizer``, ...) or for the whole checkpoint.

    Attributes:
        elements: elements of all its tensors, buffers and optimizer state included.
        parameters, buffers: the model's parameter and buffer elements, as torch counts them for a
            live module, or as the file tells them apart (see ``InspectReport.counted_by``);
            ``None`` where it cannot tell.
        trainable: parameter elements with ``requires_grad``, where known.
    """

    name: str
    tensors: int
    elements: int
    bytes: int
    values: int
    trainable: int | None = None
    parameters: int | None = None
    buffers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "tensors": self.tensors, "elements": self.elements,
                             "bytes": self.bytes, "values": self.values}
        if self.parameters is not None:
            d.update(parameters=self.parameters, buffers=self.buffers)
        return d if self.trainable is None else {**d, "trainable_parameters": self.trainable}


@dataclass(frozen=True)
class DtypeSummary:
    """How many tensors, elements and bytes one dtype accounts for."""

    dtype: str
    tensors: int
    elements: int
    bytes: int


@dataclass(frozen=True)
class KeyInfo:
    """One entry of the key list: a tensor (shape, dtype, bytes) or a value (its short repr)."""

    key: str
    section: str
    kind: str  # "tensor" or "value"
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    bytes: int = 0
    value: str | None = None
    note: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def label(self) -> str:
        """What the key tree shows next to the key."""
        if self.kind == "value":
            return f"= {self.value}"
        text = f"{list(self.shape or ())} {self.dtype}"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "value":
            return {"key": self.key, "section": self.section, "kind": "value", "value": self.value}
        d = {"key": self.key, "section": self.section, "kind": "tensor", "shape": list(self.shape or ()),
             "dtype": self.dtype, "bytes": self.bytes}
        return {**d, "note": self.note} if self.note else d


@dataclass(frozen=True)
class NotExecuted:
    """A global the file's pickle named and that was NOT executed: the call it asked for, and the
    state it would have set on the result (a dataclass's fields, for instance)."""

    key: str
    name: str
    call: str
    state: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.call}" + (f" with state {self.state}" if self.state else "")


@dataclass(frozen=True)
class InspectReport:
    """What a checkpoint holds: the record :func:`inspect` returns.

    Attributes:
        source: the path (or description) it was opened from.
        format: the reader that opened it (``lightning``, ``safetensors``, ``torch-zip``, ...).
        provenance: framework and version, epoch, step, config, as the checkpoint recorded them.
        sections: counts per section, in file order.
        totals: counts for the whole checkpoint.
        dtypes: counts per dtype, largest first.
        largest: the largest tensors, largest first.
        keys: every entry whose key matches ``keys_filter`` (all of them without a filter).
        keys_filter: the regular expression the key list was filtered with, if any.
        placeholders: globals the file's pickle named and that were NOT executed.
        notes: what the reader wants the user to know.
        counted_by: how parameters were told from buffers: ``"module"`` (torch counted a live
            module), ``"saved parameters"`` (the file kept ``nn.Parameter``) or ``"names"``
            (buffer names, and classes a .nemo config names); ``None``: only elements are known.
        buffer_keys: the keys counted as buffers by name, each with the reason.
    """

    source: str
    format: str
    provenance: dict[str, Any]
    sections: tuple[SectionSummary, ...]
    totals: SectionSummary
    dtypes: tuple[DtypeSummary, ...]
    largest: tuple[KeyInfo, ...]
    keys: tuple[KeyInfo, ...]
    keys_filter: str | None
    placeholders: tuple[NotExecuted, ...]
    notes: tuple[str, ...]
    counted_by: str | None = None
    buffer_keys: dict[str, str] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, str]:
        """Non-tensor entries of the key list: key -> short repr."""
        return {k.key: k.value or "" for k in self.keys if k.kind == "value"}

    # Machines
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.inspect/1", ...}``."""
        return {
            "schema": SCHEMA,
            "source": self.source,
            "format": self.format,
            "provenance": jsonable(self.provenance),
            "sections": [s.to_dict() for s in self.sections],
            "totals": self.totals.to_dict(),
            "counted_by": self.counted_by,
            "buffer_keys": dict(self.buffer_keys),
            "dtypes": [{"dtype": d.dtype, "tensors": d.tensors, "elements": d.elements, "bytes": d.bytes}
                       for d in self.dtypes],
            "largest": [t.to_dict() for t in self.largest],
            "keys_filter": self.keys_filter,
            "keys": [k.to_dict() for k in self.keys],
            "values": self.values,
            "placeholders": [{"key": p.key, "name": p.name, "call": p.call, "state": p.state}
                             for p in self.placeholders],
            "notes": list(self.notes),
        }

    @property
    def exit_code(self) -> int:
        """Always 0: the report describes a checkpoint and judges nothing."""
        return 0

    to_json = report_json

    # People
    def renderable(self, *, top: int = 10, fold: bool = True) -> RenderableType:
        """A rich renderable; ``fold=False`` shows every key and every placeholder. ``top`` is
        ignored: how many of the largest tensors to list is chosen by :func:`inspect`."""
        return _render_rich(self, fold=fold)

    def to_html(self, *, fold: bool = True) -> str:
        """A self-contained HTML fragment (what a notebook shows)."""
        return _html(self, fold=fold)

    render = render_report  # render(console, *, top=10, fold=True)
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=100)

    def __repr__(self) -> str:
        t = self.totals
        extra = f", {len(self.placeholders)} not executed" if self.placeholders else ""
        counts = (f"{t.parameters:,} parameters, {t.buffers:,} buffer elements" if t.parameters is not None
                  else f"{t.elements:,} elements")
        return (f"<InspectReport {self.format} {self.source!r}: {t.tensors} tensors, {counts}, "
                f"{human_bytes(t.bytes)}{extra}>")


def _is_module(source: object) -> bool:
    torch = sys.modules.get("torch")  # a live module means torch is imported; a path need not import it
    return torch is not None and isinstance(source, torch.nn.Module)


def inspect(source: Any, /, *, keys: str | None = None, top: int = 10) -> InspectReport:
    """Summarise a checkpoint from its metadata alone; no tensor data is read.

    Args:
        source: anything :func:`tensorparity.open` takes (a path, a module, a state dict, a
            :class:`Checkpoint`; a Checkpoint passed in is left open).
        keys: a regular expression; only keys it matches (``re.search``) are listed.
            Counts, dtypes and the largest tensors always cover the whole checkpoint.
        top: how many of the largest tensors to list.

    Raises:
        UsageError: ``keys`` is not a valid regular expression, or ``top`` is negative.
        SourceError: the checkpoint cannot be opened (see :func:`tensorparity.open`).

    Example:
        >>> import torch
        >>> report = inspect(torch.nn.BatchNorm1d(4), keys=r"weight")
        >>> report.totals.parameters, report.totals.buffers, [k.key for k in report.keys]
        (8, 9, ['weight'])
        >>> report.to_dict()["schema"]
        'tensorparity.inspect/1'
    """
    pattern = key_pattern("keys", keys)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise UsageError(f"top must be a non-negative integer, not {top!r}",
                         fix="pass 0 or more, e.g. top=10")
    owned = not isinstance(source, Checkpoint)
    ckpt = open_checkpoint(source)
    try:
        return _summarise(ckpt, pattern, top, module_counts(source) if _is_module(source) else None)
    finally:
        if owned:
            ckpt.close()


def render_html(ckpt: Checkpoint, *, keys: str | None = None, top: int = 10) -> str:
    """The HTML a notebook shows for a :class:`Checkpoint` (``Checkpoint._repr_html_``).

    Example:
        >>> import torch, tensorparity
        >>> "<table" in render_html(tensorparity.open({"w": torch.zeros(2)}))
        True
    """
    return inspect(ckpt, keys=keys, top=top).to_html()


def key_pattern(name: str, pattern: str | None) -> re.Pattern[str] | None:
    """A key filter given by the user (``--keys``, ``--include``...), compiled, or a one-line error.

    Example:
        >>> key_pattern("keys", "layers.(") is None
        Traceback (most recent call last):
        ...
        tensorparity.errors.UsageError: keys filter 'layers.(' is not a valid regular expression (missing ), unterminated subpattern at position 7); fix: escape special characters with a backslash, e.g. 'layers\\.0\\.' for the literal text 'layers.0.'
    """
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise UsageError(f"{name} must be a regular expression string, not {type(pattern).__name__}",
                         fix=rf"pass a string such as {name}='layers\.0\.'")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{name} filter {pattern!r} is not a valid regular expression ({exc})",
                         fix=r"escape special characters with a backslash, e.g. 'layers\.0\.' "
                             r"for the literal text 'layers.0.'") from None


def _summarise(ckpt: Checkpoint, pattern: re.Pattern[str] | None, top: int, live: Counts | None) -> InspectReport:
    per_section: dict[str, list[int]] = {}  # name -> [tensors, elements, bytes, values]
    model_tensors: list[TensorEntry] = []
    per_dtype: dict[str, list[int]] = {}
    tensors: list[KeyInfo] = []
    listed: list[KeyInfo] = []
    for key in ckpt:
        entry = ckpt[key]
        section = ckpt.section_of(key)
        counts = per_section.setdefault(section, [0, 0, 0, 0])
        if isinstance(entry, TensorEntry):
            dtype = entry.dtype_name
            counts[0] += 1
            counts[1] += entry.numel
            counts[2] += entry.nbytes
            d = per_dtype.setdefault(dtype, [0, 0, 0])
            d[0] += 1
            d[1] += entry.numel
            d[2] += entry.nbytes
            if section == "model":
                model_tensors.append(entry)
            info = KeyInfo(key, section, "tensor", tuple(entry.shape), dtype, entry.nbytes,
                           note=entry.note)
            tensors.append(info)
        else:
            counts[3] += 1
            info = KeyInfo(key, section, "value", value=short_repr(entry.value))
        if pattern is None or pattern.search(key):
            listed.append(info)
    trainable = ckpt.provenance.get("trainable_parameters")
    if isinstance(trainable, bool) or not isinstance(trainable, int):
        trainable = None
    named = {} if live is not None else buffer_keys(ckpt)
    model = live or entry_counts(model_tensors, named, trainable=trainable)
    # Parameters and buffers are the model's: other sections (optimizer state) count elements only.
    sections = tuple(SectionSummary(name, c[0], c[1], c[2], c[3], model.trainable if name == "model" else None,
                                    *((model.parameters, model.buffers) if name == "model" else (None, None)))
                     for name, c in per_section.items())
    n_tensors, n_elements, n_bytes, n_values = (sum(c[i] for c in per_section.values()) for i in range(4))
    totals = SectionSummary("total", n_tensors, n_elements, n_bytes, n_values, model.trainable,
                            model.parameters, model.buffers)
    dtypes = tuple(sorted((DtypeSummary(k, *v) for k, v in per_dtype.items()),
                          key=lambda d: (-d.bytes, d.dtype)))
    largest = tuple(sorted(tensors, key=lambda t: -t.bytes)[:top])  # stable: ties stay in file order
    return InspectReport(
        source=str(ckpt.source), format=ckpt.format, provenance=dict(ckpt.provenance),
        sections=sections, totals=totals, dtypes=dtypes, largest=largest, keys=tuple(listed),
        keys_filter=pattern.pattern if pattern is not None else None,
        placeholders=tuple(_not_executed(ckpt, p) for p in ckpt.placeholders),
        notes=tuple(ckpt.notes) + _count_notes(model, named), counted_by=model.basis,
        buffer_keys={k: named[k] for k in named if ckpt.section_of(k) == "model"})


def _count_notes(counts: Counts, named: dict[str, str]) -> tuple[str, ...]:
    if counts.basis == "names":
        reasons = sorted(set(named.values()))
        return (f"parameters and buffers told apart by name ({'; '.join(reasons)}); a buffer of another name "
                f"is counted as a parameter",)
    if counts.basis is None and counts.elements:
        return ("the file does not say which tensors are parameters and which are buffers: counts are tensor "
                "elements; inspect the live module (tensorparity.inspect(model)) for torch's own counts",)
    return ()


def _not_executed(ckpt: Checkpoint, info: PlaceholderInfo) -> NotExecuted:
    entry = ckpt.get(info.key)
    state = entry.value.state if isinstance(entry, ValueEntry) and isinstance(entry.value, Placeholder) else None
    return NotExecuted(info.key, info.name, printable(info.call),
                       short_repr(state, 200) if state is not None else None)


def _section_rows(r: InspectReport) -> tuple[list[str], list[list[str]]]:
    """The Sections table: elements always; parameters, buffers and trainable where known."""
    split = r.totals.parameters is not None
    trainable = r.totals.trainable is not None
    columns = ["section", "tensors", "elements", *(["parameters", "buffers"] if split else []), "bytes", "values",
               *(["trainable"] if trainable else [])]

    def cell(n: int | None) -> str:
        return "" if n is None else f"{n:,}"

    rows = [[s.name, f"{s.tensors:,}", f"{s.elements:,}",
             *([cell(s.parameters), cell(s.buffers)] if split else []), human_bytes(s.bytes), f"{s.values:,}",
             *([cell(s.trainable)] if trainable else [])] for s in (*r.sections, r.totals)]
    return columns, rows


# ---------------------------------------------------------------------------------------------
# HTML (self-contained: one scoped style block, no scripts)

_STYLE = ("<style>.tp-inspect{font-family:ui-monospace,monospace;font-size:12px}"
          ".tp-inspect table{border-collapse:collapse;margin:2px 0 8px}"
          ".tp-inspect th,.tp-inspect td{text-align:left;padding:1px 10px 1px 0}"
          ".tp-inspect ul{margin:0;padding-left:1.4em;list-style:none}.tp-inspect .d{color:#888}"
          ".tp-inspect .warn{border:2px solid #c90;padding:4px 8px;margin:6px 0}</style>")


def _html(r: InspectReport, *, fold: bool) -> str:
    e = html.escape
    prov = " &middot; ".join(f"{e(k)}: {e(v)}" for k, v in provenance_items(r.provenance))
    parts = [f"<div class='tp-inspect'>{_STYLE}<b>{e(printable(r.source))}</b> &mdash; {e(r.format)}"
             f"<div class='d'>{prov}</div>"]
    columns, rows = _section_rows(r)
    parts.append(html_table("Sections", columns, rows))
    parts.append(html_table("Dtypes", ["dtype", "tensors", "elements", "bytes"],
                             [[d.dtype, f"{d.tensors:,}", f"{d.elements:,}", human_bytes(d.bytes)]
                              for d in r.dtypes]))
    if r.largest:
        parts.append(html_table("Largest tensors", ["key", "shape", "dtype", "bytes"],
                                 [[printable(t.key), str(list(t.shape or ())), t.dtype or "", human_bytes(t.bytes)]
                                  for t in r.largest]))
    parts.append(f"<details open><summary><b>Keys</b> ({len(r.keys):,})</summary>"
                 f"{html_tree(_key_tree(r.keys, fold=fold))}</details>")
    if r.placeholders:
        shown = r.placeholders[:MAX_PLACEHOLDERS_SHOWN] if fold else r.placeholders
        more = len(r.placeholders) - len(shown)
        lines = "".join(f"<li>{e(str(p))}</li>" for p in shown) + (f"<li>… {more} more</li>" if more else "")
        parts.append(f"<div class='warn'><b>Not executed ({len(r.placeholders)})</b>: code this file asked "
                     f"to run; tensorparity recorded it and ran none of it.<ul>{lines}</ul></div>")
    parts += [f"<div class='d'>note: {e(printable(n))}</div>" for n in r.notes]
    return "".join(parts) + "</div>"


# ---------------------------------------------------------------------------------------------
# rich


def _render_rich(r: InspectReport, *, fold: bool) -> RenderableType:
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = rich_table
    header = Table.grid(padding=(0, 2))
    for name, text in [("file", printable(r.source)), ("format", r.format), *header_rows(r.provenance)]:
        header.add_row(Text(name, style="bold"), Text(text))
    parts: list[RenderableType] = [header, Text()]

    columns, rows = _section_rows(r)
    sections = table("Sections", *columns)
    for i, cells in enumerate(rows):
        if i == len(rows) - 1:  # the totals: the footer, under a rule
            sections.show_footer = True
            for column, cell in zip(sections.columns, cells, strict=True):
                column.footer = Text(cell, style="bold")
        else:
            sections.add_row(*(Text(c) for c in cells))
    parts.append(sections)
    if r.dtypes:
        dtypes = table("Dtypes", "dtype", "tensors", "elements", "bytes")
        for d in r.dtypes:
            dtypes.add_row(*(Text(c) for c in (d.dtype, f"{d.tensors:,}", f"{d.elements:,}", human_bytes(d.bytes))))
        parts += [Text(), dtypes]
    if r.largest:
        largest = table("Largest tensors", "key", "shape", "dtype", "bytes")
        for t in r.largest:
            cells = (printable(t.key), str(list(t.shape or ())), t.dtype or "", human_bytes(t.bytes))
            largest.add_row(*(Text(c) for c in cells))
        parts += [Text(), largest]

    total_keys = r.totals.tensors + r.totals.values
    title = (f"Keys matching /{printable(r.keys_filter)}/ ({len(r.keys):,} of {total_keys:,})"
             if r.keys_filter is not None else f"Keys ({len(r.keys):,})")
    parts += [Text(), rich_tree(title, _key_tree(r.keys, fold=fold))]

    if r.placeholders:
        shown = r.placeholders[:MAX_PLACEHOLDERS_SHOWN] if fold else r.placeholders
        body = Text("This file asked to run the code below. tensorparity recorded each call and ran none "
                    "of it; the values at these keys are placeholders.\n", style="yellow")
        for p in shown:
            body.append(f"\n{printable(p.key)}", style="bold")
            body.append(f": {p.call}")
            if p.state:
                body.append(f" with state {p.state}", style="dim")
        if len(shown) < len(r.placeholders):
            body.append(f"\n… {len(r.placeholders) - len(shown)} more (--all or --json lists them)", style="dim")
        parts += [Text(), Panel(body, title=f"Not executed ({len(r.placeholders)})", title_align="left",
                                border_style="yellow", box=box.HEAVY)]
    for note in r.notes:
        parts.append(Text(f"note: {printable(note)}", style="dim"))
    return Group(*parts)

