"""The record :func:`tensorparity.diff` returns, and its renderings: rich (terminal), HTML
(notebook), JSON (schema ``tensorparity.diff/1``).

A :class:`DiffReport` holds, per section, the keys common to both sides and those only in one,
every tensor comparison (:class:`~tensorparity.numerics.TensorComparison`), every difference of a
non-tensor value, element counts of each side and the tolerance used. Its verdict is
``identical`` (every key and every byte matches), ``close`` (every key matches, every tensor is
within tolerance, some are not bitwise equal or not of one dtype) or ``differs``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.checkpoint._roles import Counts
from tensorparity.numerics import TensorComparison, Tolerance
from tensorparity.report import Unbroken, render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._keytree import Node, html_tree, key_tree, rich_tree
from tensorparity.report._render import (
    dtype_cell,
    fold_count,
    html_comparisons,
    html_style,
    html_table,
    human_count,
    jsonable,
    key_cell,
    num,
    plural,
    printable,
    record_dict,
    rich_comparisons,
    rich_header,
    rich_titled_table,
)

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from tensorparity.checkpoint._inspect import KeyInfo

__all__ = ["SCHEMA", "DiffReport", "MappingInfo", "SectionDiff", "Side", "ValueDifference", "Verdict"]

SCHEMA = "tensorparity.diff/1"
Verdict = Literal["identical", "close", "differs"]
_VERDICT_STYLE = {"identical": "bold green", "close": "bold green", "differs": "bold red"}
_FOLD_HINT = "--top N shows more, --json lists all"


@dataclass(frozen=True)
class Side:
    """One side of a diff, as compared.

    Attributes:
        source: what was opened (a path, or a description of a live object).
        format: the reader that opened it.
        selected: what part was compared when not the whole (``"model weights (prefix
            'state_dict.' removed)"``), else ``None``.
        keys, tensors, bytes: counts over what was compared.
        parameters: tensor *elements* over what was compared, buffers included (the field keeps
            its old name; :attr:`elements` says what it is, and the JSON calls it ``elements``).
        trainable: trainable parameters, when the source recorded them.
        buffers: buffer elements among them, where the source tells buffers apart (a load check
            reads BatchNorm statistics and the like by name); ``None`` when it does not.
    """

    source: str
    format: str
    selected: str | None
    keys: int
    tensors: int
    parameters: int
    bytes: int
    trainable: int | None = None
    buffers: int | None = None

    @property
    def elements(self) -> int:
        """Tensor elements compared (parameters and buffers together)."""
        return self.parameters

    @property
    def counts(self) -> Counts:
        """The counts as words can say them: parameters and buffers where known, else elements."""
        if self.buffers is None:
            return Counts(self.parameters, trainable=self.trainable)
        return Counts(self.parameters, self.parameters - self.buffers, self.buffers, self.trainable, "names")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "format": self.format, "selected": self.selected,
                             "keys": self.keys, "tensors": self.tensors, "elements": self.elements}
        if self.buffers is not None:  # parameters only where buffers are told apart
            d.update(parameters=self.elements - self.buffers, buffers=self.buffers)
        return {**d, "bytes": self.bytes, "trainable_parameters": self.trainable}


@dataclass(frozen=True)
class MappingInfo:
    """The mapping A was translated through, and what it left alone.

    Attributes:
        source, name, rules: the file (or ``<mapping built in Python>``), its name, its rule count.
        unmapped: A's keys no rule claimed (listed as only in A).
        ignored_a, ignored_b: keys the mapping's ignore patterns left out of the comparison.
        passed_through: A's keys that kept their name (no rule claimed them; ``passthrough``).
    """

    source: str
    name: str
    rules: int
    unmapped: tuple[str, ...] = ()
    ignored_a: tuple[str, ...] = ()
    ignored_b: tuple[str, ...] = ()
    passed_through: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class ValueDifference:
    """A non-tensor entry (hyper-parameter, version, config value) that differs, or a key that
    is a tensor on one side and a value on the other (``kind="kind"``)."""

    key: str
    section: str
    a: str
    b: str
    kind: Literal["value", "type", "kind"] = "value"

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class SectionDiff:
    """Counts and key lists for one section (``model``, ``optimizer``, ``hyper_parameters``, ...).

    ``parameters_a`` and ``parameters_b`` are tensor *elements* of each side's section, buffers
    and optimizer state included (old field names; the JSON says ``elements_a``, ``elements_b``).
    """

    name: str
    common: int
    only_a: tuple[KeyInfo, ...]
    only_b: tuple[KeyInfo, ...]
    identical: int = 0
    close: int = 0
    shape_mismatches: int = 0
    dtype_mismatches: int = 0
    value_mismatches: int = 0
    value_differences: int = 0
    parameters_a: int = 0
    parameters_b: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = record_dict(self)
        d["only_in_a"] = [k.to_dict() for k in d.pop("only_a")]
        d["only_in_b"] = [k.to_dict() for k in d.pop("only_b")]
        d["elements_a"], d["elements_b"] = d.pop("parameters_a"), d.pop("parameters_b")
        return d


@dataclass(frozen=True)
class DiffReport:
    """Two checkpoints compared: the record :func:`tensorparity.diff` returns.

    Attributes:
        a, b: the two sides as compared.
        tolerance: the tolerance asked for (each comparison records the one it resolved to).
        sections: per-section counts and key lists, in A's order (then sections only B has).
        tensors: every tensor pair compared, in A's key order.
        tensor_sections: the section of each entry of ``tensors``.
        values: every non-tensor difference.
        mapping: the mapping A was translated through, if any.
        origins: compared key -> the keys of A it was made from, where the mapping renamed it.
        include, exclude: the key filters applied (on A's keys).
        notes: what tensorparity wants the reader to know (what was selected, hints).

    Example:
        >>> import torch, tensorparity
        >>> r = tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)})
        >>> r.verdict, r.exit_code, r.classic_summary()[:29]
        ('identical', 0, 'Common keys: 1 / Only in A: 0')
    """

    a: Side
    b: Side
    tolerance: Tolerance
    sections: tuple[SectionDiff, ...]
    tensors: tuple[TensorComparison, ...]
    tensor_sections: tuple[str, ...]
    values: tuple[ValueDifference, ...] = ()
    mapping: MappingInfo | None = None
    origins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    include: str | None = None
    exclude: str | None = None
    notes: tuple[str, ...] = field(default=())

    # Counts
    @property
    def common(self) -> int:
        return sum(s.common for s in self.sections)

    @property
    def only_in_a(self) -> tuple[KeyInfo, ...]:
        return tuple(k for s in self.sections for k in s.only_a)

    @property
    def only_in_b(self) -> tuple[KeyInfo, ...]:
        return tuple(k for s in self.sections for k in s.only_b)

    @property
    def shape_mismatches(self) -> tuple[TensorComparison, ...]:
        return tuple(t for t in self.tensors if t.status == "shape")

    @property
    def dtype_mismatches(self) -> tuple[TensorComparison, ...]:
        return tuple(t for t in self.tensors if t.dtype_differs)

    @property
    def mismatches(self) -> tuple[TensorComparison, ...]:
        """Tensors whose values are outside tolerance, worst first (fraction, then max abs)."""
        bad = [t for t in self.tensors if t.status == "mismatch"]
        return tuple(sorted(bad, key=lambda t: (-t.frac_mismatch, -t.max_abs)))

    @property
    def close_tensors(self) -> tuple[TensorComparison, ...]:
        """Tensors within tolerance but not bitwise identical, largest error first."""
        return tuple(sorted((t for t in self.tensors if t.status == "close"), key=lambda t: -t.max_abs))

    @property
    def n_value_mismatches(self) -> int:
        """Tensors outside tolerance plus non-tensor values that differ."""
        return sum(t.status == "mismatch" for t in self.tensors) + len(self.values)

    # Verdict
    @property
    def verdict(self) -> Verdict:
        if self.only_in_a or self.only_in_b or self.values or not all(t.passed for t in self.tensors):
            return "differs"
        return "identical" if all(t.status == "identical" for t in self.tensors) else "close"

    @property
    def passed(self) -> bool:
        return self.verdict != "differs"

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 when the two are the same (identical or close), 1 when they differ."""
        return 0 if self.passed else 1

    @property
    def required_atol(self) -> float | None:
        """The smallest atol (each tensor keeping its rtol) with which every tensor would pass;
        ``None`` when no atol can do it (shapes or NaN/Inf places differ, NaN != NaN, exact mode)."""
        if any(t.status == "shape" or not (t.nan_agree and t.inf_agree)
               or (not t.tolerance.equal_nan and (t.nan_a or t.nan_b)) for t in self.tensors):
            return None
        if self.tolerance.exact and any(t.status != "identical" for t in self.tensors):
            return None
        return max((t.required_atol for t in self.tensors), default=0.0)

    def classic_summary(self) -> str:
        """The seeds' line: ``Common keys: 150 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 /
        Value mismatches: 0 → identical`` (value mismatches count non-tensor differences too)."""
        return (f"Common keys: {self.common} / Only in A: {len(self.only_in_a)} / Only in B: {len(self.only_in_b)} / "
                f"Shape mismatches: {len(self.shape_mismatches)} / Value mismatches: {self.n_value_mismatches} "
                f"→ {self.verdict}")

    def summary(self) -> str:
        """One line for humans: the verdict and the reason for it.

        Example:
            >>> import torch, tensorparity
            >>> tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2).bfloat16()}).summary()
            'close: 1 tensor within tolerance, 0 bitwise identical; 1 dtype difference'
        """
        n = len(self.tensors)
        dtype = f"; {plural(len(self.dtype_mismatches), 'dtype difference')}" if self.dtype_mismatches else ""
        if self.verdict == "identical":
            return f"identical: {plural(self.common, 'key')}, {plural(n, 'tensor')}, every byte the same"
        if self.verdict == "close":
            same = sum(t.status == "identical" for t in self.tensors)
            return f"close: {plural(n, 'tensor')} within tolerance, {same:,} bitwise identical{dtype}"
        parts = []
        if self.mismatches:
            w = self.mismatches[0]
            parts.append(f"{len(self.mismatches):,} of {plural(n, 'tensor')} outside tolerance (worst "
                         f"{printable(w.key)}: max abs {num(w.max_abs)}, {w.n_mismatch:,} of "
                         f"{plural(w.numel, 'element')})")
        for count, what, many in ((len(self.shape_mismatches), "shape mismatch", "shape mismatches"),
                                  (len(self.values), "non-tensor value differs", "non-tensor values differ"),
                                  (len(self.only_in_a), "key only in A", "keys only in A"),
                                  (len(self.only_in_b), "key only in B", "keys only in B")):
            if count:
                parts.append(plural(count, what, many))
        return "differs: " + ", ".join(parts) + dtype

    # Machines
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.diff/1", ...}`` (strict JSON: no NaN/inf)."""
        tensors = []
        for section, t in zip(self.tensor_sections, self.tensors, strict=True):
            d = t.to_dict()
            d["tolerance"]["description"] = t.tolerance.describe()
            tensors.append({"section": section, **d, "a_keys": list(self.origins.get(t.key, (t.key,)))})
        return jsonable({
            "schema": SCHEMA,
            "verdict": self.verdict,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "summary": self.summary(),
            "classic_summary": self.classic_summary(),
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "mapping": self.mapping.to_dict() if self.mapping else None,
            "tolerance": {"description": self.tolerance.describe(), **self.tolerance.to_dict()},
            "filters": {"include": self.include, "exclude": self.exclude},
            "counts": {
                "common": self.common, "only_in_a": len(self.only_in_a), "only_in_b": len(self.only_in_b),
                "tensors": len(self.tensors), "identical": sum(t.status == "identical" for t in self.tensors),
                "close": sum(t.status == "close" for t in self.tensors),
                "shape_mismatches": len(self.shape_mismatches), "dtype_mismatches": len(self.dtype_mismatches),
                "tensor_value_mismatches": len(self.mismatches), "value_differences": len(self.values),
                "value_mismatches": self.n_value_mismatches,
            },
            "required_atol": self.required_atol,
            "sections": [s.to_dict() for s in self.sections],
            "tensors": tensors,
            "values": [v.to_dict() for v in self.values],
            "notes": list(self.notes),
        })

    to_json = report_json

    # People
    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: summary first, then the worst mismatches; lists longer than ``top``
        are folded."""
        return _render_rich(self, top=top)

    def to_html(self, *, top: int = 10) -> str:
        """A self-contained HTML fragment (what a notebook shows)."""
        return _html(self, top=top)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = report_text

    def __repr__(self) -> str:
        return f"<DiffReport {self.a.source!r} vs {self.b.source!r}: {self.classic_summary()}>"


# ---------------------------------------------------------------------------------------------
# Renderings


def _side_line(side: Side) -> str:
    text = f"{printable(side.source)}  ({side.format}, {plural(side.tensors, 'tensor')}, {side.counts.describe()}"
    return text + ")" + (f"  [{printable(side.selected)}]" if side.selected else "")


def _header(r: DiffReport) -> list[tuple[str, str]]:
    rows = [("A", _side_line(r.a)), ("B", _side_line(r.b))]
    if r.mapping:
        m = r.mapping
        rows.append(("mapping", f"{printable(m.source)}  ({printable(m.name)}, {plural(m.rules, 'rule')}; unmapped "
                                f"{len(m.unmapped)}, ignored {len(m.ignored_a)} in A and {len(m.ignored_b)} in B)"))
    rows.append(("tolerance", r.tolerance.describe()))
    for name, pattern in (("include", r.include), ("exclude", r.exclude)):
        if pattern is not None:
            rows.append((name, f"/{printable(pattern)}/ on A's keys"))
    return rows


def _tables(r: DiffReport, top: int) -> list[tuple[str, list[str], list[list[str]], int]]:
    """The report's tables after the mismatches: (title, columns, rows shown, rows in all)."""
    out: list[tuple[str, list[str], list[list[str]], int]] = []

    def add(title: str, columns: list[str], rows: list[list[str]]) -> None:
        if rows:
            out.append((f"{title} ({len(rows):,})", columns, rows[:top], len(rows)))

    add("Shape mismatches, never broadcast", ["key", "shape A", "shape B", "dtype"],
        [[key_cell(t), str(list(t.shape_a)), str(list(t.shape_b)), dtype_cell(t)] for t in r.shape_mismatches])
    add("Non-tensor differences", ["key", "A", "B"], [[printable(v.key), v.a, v.b] for v in r.values])
    # The smallest tolerance that passes: atol at the tensor's rtol, or rtol at its atol.
    add("Within tolerance, not bitwise identical, largest error first",
        ["key", "max abs", "max rel", "cosine", "atol needed", "rtol needed"],
        [[key_cell(t), num(t.max_abs), num(t.max_rel), f"{t.cosine:.6f}", num(t.required_atol), num(t.required_rtol)]
         for t in r.close_tensors])
    return out


def _dtype_line(r: DiffReport) -> str:
    """``Dtype differences (12), values compared after promotion: float32 → bfloat16 ×12``."""
    pairs: dict[str, int] = {}
    for t in r.dtype_mismatches:
        pair = f"{t.dtype_a} → {t.dtype_b}"
        pairs[pair] = pairs.get(pair, 0) + 1
    return (f"Dtype differences ({len(r.dtype_mismatches):,}), values compared after promotion: "
            + ", ".join(f"{p} ×{n:,}" for p, n in pairs.items()))


def _sections_rows(r: DiffReport) -> list[list[str]]:
    # Elements (parameters, buffers, optimizer state) in short form (27.4K, 7.2B): the header and
    # the JSON have them in full.
    return [[s.name, *(f"{n:,}" for n in (s.common, len(s.only_a), len(s.only_b), s.shape_mismatches,
                                          s.dtype_mismatches, s.value_mismatches + s.value_differences,
                                          s.identical, s.close)),
             human_count(s.parameters_a), human_count(s.parameters_b)]
            for s in r.sections]


_LEFT = ("key", "shape", "dtype", "A", "B")
# Short two-line headers keep the table inside 80 columns ("same" = identical bytes).
_SECTION_COLUMNS = ["section", "common", "only\nin A", "only\nin B", "shape\n≠", "dtype\n≠", "value\n≠", "same",
                    "close", "elements\nA", "elements\nB"]


def _only_tree(keys: tuple[KeyInfo, ...]) -> list[Node]:
    # Natural order: safetensors stores keys in string order (1, 10, 2), which would split runs.
    return key_tree(keys, fold=True, more_hint="--json lists them", natural=True)


def _render_rich(r: DiffReport, *, top: int) -> RenderableType:
    from rich.console import Group

    head, classic, body = _rich_parts(r, top=top)
    return Group(*head, Unbroken(classic), *body)  # the classic line: printed whole, scripts grep for it


def _rich_parts(r: DiffReport, *, top: int) -> tuple[list[RenderableType], Text, list[RenderableType]]:
    """The header, the classic summary line, and everything after it."""
    from rich.text import Text

    classic = Text(r.classic_summary(), style=_VERDICT_STYLE[r.verdict])
    parts: list[RenderableType] = [Text(r.summary()), Text()]
    parts += rich_titled_table("Sections", _SECTION_COLUMNS, _sections_rows(r), left=())
    if r.mismatches:  # the widest record: a block of lines each, not a table row
        parts += [Text(), *rich_comparisons("Value mismatches, worst first", r.mismatches, top=top, hint=_FOLD_HINT,
                                            origins=r.origins)]
    for title, columns, rows, total in _tables(r, top):
        parts += [Text(), *rich_titled_table(title, columns, rows, total=total, hint=_FOLD_HINT, left=_LEFT)]
    if r.dtype_mismatches:
        parts += [Text(), Text(_dtype_line(r), style="bold")]
    for title, keys in (("Only in A", r.only_in_a), ("Only in B", r.only_in_b)):
        if keys:
            parts += [Text(), rich_tree(f"{title} ({len(keys):,})", _only_tree(keys))]
    if r.required_atol is not None and r.verdict == "differs" and not (r.only_in_a or r.only_in_b or r.values):
        parts += [Text(), Text(f"Every tensor would pass with --atol {num(r.required_atol)} "
                               "(each keeping its rtol).", style="dim")]
    parts += [Text()] if r.notes else []
    for note in r.notes:
        parts.append(Text(f"note: {printable(note)}", style="dim"))
    return [rich_header(_header(r)), Text()], classic, parts


def _html(r: DiffReport, *, top: int) -> str:
    e = html.escape
    head = "".join(f"<div><b>{e(name)}</b> {e(text)}</div>" for name, text in _header(r))
    parts = [f"<div class='tp-diff'>{html_style('tp-diff')}{head}",
             f"<p class='{'ok' if r.passed else 'bad'}'>{e(r.classic_summary())}</p><p>{e(r.summary())}</p>",
             html_table("Sections", _SECTION_COLUMNS, _sections_rows(r))]
    if r.mismatches:
        parts.append(html_comparisons("Value mismatches, worst first", r.mismatches, top=top, hint=_FOLD_HINT,
                                      origins=r.origins))
    for title, columns, rows, total in _tables(r, top):
        more = [[fold_count(len(rows), total, _FOLD_HINT)]] if total > len(rows) else []
        parts.append(html_table(title, columns, rows + more))
    if r.dtype_mismatches:
        parts.append(f"<p><b>{e(_dtype_line(r))}</b></p>")
    for title, keys in (("Only in A", r.only_in_a), ("Only in B", r.only_in_b)):
        if keys:
            parts.append(f"<details open><summary><b>{title}</b> ({len(keys):,})</summary>"
                         f"{html_tree(_only_tree(keys))}</details>")
    parts += [f"<div class='d'>note: {e(printable(n))}</div>" for n in r.notes]
    return "".join(parts) + "</div>"
