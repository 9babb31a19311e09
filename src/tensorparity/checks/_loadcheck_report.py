"""The record :func:`tensorparity.checks._loadcheck.load_check` returns, and its renderings: rich
(terminal) and JSON (schema ``tensorparity.load-check/1``).

A :class:`LoadCheckReport` holds the checkpoint's counts, one :class:`LoadSide` per model the
checkpoint was loaded into (the local model, and the reference when its package is installed),
and the :class:`~tensorparity.checks._diff_report.DiffReport` of the two loaded state dicts. Each side
says by which route the checkpoint reached it (as is, or through the mapping), every key problem
(missing, unexpected, shape, dtype), how ``load_state_dict`` was called, the model's parameter
and buffer counts (torch's own), and
the round trip: what the model holds after loading against what it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.checks._diff_report import DiffReport, Side
from tensorparity.numerics import Tolerance
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import (
    fold_count,
    jsonable,
    plural,
    printable,
    record_dict,
    rich_comparisons,
    rich_header,
    rich_titled_table,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "IssueKind", "KeyIssue", "LoadCheckReport", "LoadSide", "NotInstalled"]

SCHEMA = "tensorparity.load-check/1"
IssueKind = Literal["missing", "unexpected", "shape", "dtype", "kind"]
Route = Literal["as_is", "a_to_b", "b_to_a"]
_HINT = "--top N shows more, --json lists all"
_KIND_TITLE = {"missing": "Missing keys: the model has them, the checkpoint does not",
               "unexpected": "Unexpected keys: the checkpoint has them, the model does not",
               "shape": "Shape mismatches, never broadcast (not loaded)",
               "dtype": "Dtype mismatches (not loaded; --cast loads them cast to the model's dtype)",
               "kind": "Not a tensor where the model expects one (not loaded)"}


@dataclass(frozen=True)
class KeyIssue:
    """One key that does not load cleanly into a model.

    Attributes:
        key: the model's key (for ``unexpected``: the checkpoint's key as offered to the model).
        kind: ``missing``, ``unexpected``, ``shape``, ``dtype`` or ``kind`` (a value where the
            model expects a tensor).
        checkpoint: what the checkpoint holds (``"[4, 8] bfloat16"``), ``None`` when missing.
        model: what the model expects, ``None`` when unexpected.
        origin: the checkpoint keys it was made from, when a mapping renamed or fused them.
        note: anything else (``"no rule of the mapping claims it"``).
    """

    key: str
    kind: IssueKind
    checkpoint: str | None = None
    model: str | None = None
    origin: tuple[str, ...] = ()
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class LoadSide:
    """The checkpoint loaded into one model.

    Attributes:
        role: ``model`` (the local implementation) or ``reference``.
        factory: how the model was named (``pkg.mod:make``) or described.
        model_class: the model's class, ``module.QualName``.
        route: how the checkpoint reached the model: ``as_is``, ``a_to_b`` (through the mapping)
            or ``b_to_a`` (through its inverse); ``route_text`` says it in words.
        expected: keys in the model's ``state_dict()``.
        offered: keys the checkpoint offered, after the route (plus keys a mapping left unmapped).
        loaded: keys ``load_state_dict`` took.
        strict: whether it was loaded by ``load_state_dict(strict=True)``.
        issues: every key problem, in the model's key order (unexpected keys last).
        cast: keys cast to the model's dtype (only with ``cast=True``).
        ignored: checkpoint keys the mapping's ignore patterns left out.
        parameters, trainable, buffers: the model's counts as torch gives them:
            ``sum(p.numel() for p in model.parameters())`` (trainable: those with
            ``requires_grad``) and ``sum(b.numel() for b in model.buffers())``.
        round_trip: ``state_dict()`` after loading against the tensors given, bitwise.
        error: what ``load_state_dict`` raised although the checks passed (a hook, a custom
            ``_load_from_state_dict``), one line.
        require_strict: whether missing and unexpected keys fail this side.
    """

    role: str
    factory: str
    model_class: str
    route: Route
    route_text: str
    expected: int
    offered: int
    loaded: int
    strict: bool
    issues: tuple[KeyIssue, ...]
    cast: tuple[str, ...]
    ignored: tuple[str, ...]
    parameters: int
    trainable: int
    buffers: int
    round_trip: DiffReport | None
    error: str | None = None
    require_strict: bool = True

    def of_kind(self, kind: IssueKind) -> tuple[KeyIssue, ...]:
        """The issues of one kind."""
        return tuple(i for i in self.issues if i.kind == kind)

    @property
    def failures(self) -> tuple[KeyIssue, ...]:
        """The issues that fail this side (missing/unexpected only when ``require_strict``)."""
        soft = ("missing", "unexpected") if not self.require_strict else ()
        return tuple(i for i in self.issues if i.kind not in soft)

    @property
    def passed(self) -> bool:
        return (self.error is None and not self.failures
                and (self.round_trip is None or self.round_trip.passed))

    def problems(self) -> list[str]:
        """What went wrong, in short phrases (empty when it loaded cleanly)."""
        if self.error:
            return [f"load_state_dict raised {self.error}"]
        parts = [plural(n, one, many) for n, one, many in (
            (len(self.of_kind("missing")), "missing key", None), (len(self.of_kind("unexpected")), "unexpected key", None),
            (len(self.of_kind("shape")), "shape mismatch", "shape mismatches"),
            (len(self.of_kind("dtype")), "dtype mismatch", "dtype mismatches"),
            (len(self.of_kind("kind")), "non-tensor value", None)) if n]
        if self.round_trip is not None and not self.round_trip.passed:
            bad = sum(not t.passed for t in self.round_trip.tensors)
            parts.append(f"state_dict() after loading differs from what was loaded ({plural(bad, 'tensor')})")
        return parts

    def summary(self) -> str:
        """One line: how it loaded and what went wrong."""
        if self.error:
            return self.problems()[0]
        how = "strict=True" if self.strict else f"strict=False, {self.loaded:,} of {self.expected:,} keys"
        parts = self.problems()
        return f"loaded ({how})" + (": " + ", ".join(parts) if parts else "")

    def to_dict(self) -> dict[str, Any]:
        d = record_dict(self)
        d["issues"] = [i.to_dict() for i in self.issues]
        d["passed"], d["summary"] = self.passed, self.summary()
        rt = self.round_trip
        d["round_trip"] = None if rt is None else {
            "verdict": rt.verdict, "passed": rt.passed, "summary": rt.summary(), "tensors": len(rt.tensors),
            "differing": [t.to_dict() for t in rt.tensors if t.status != "identical"]}
        return d


@dataclass(frozen=True)
class NotInstalled:
    """A reference factory whose package is not installed: the local side was checked alone."""

    package: str
    factory: str

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class LoadCheckReport:
    """A checkpoint loaded into a model (and a reference): the record ``load_check`` returns.

    Attributes:
        checkpoint: the checkpoint's weights as opened (counts over every tensor).
        sides: the model first, then the reference when it was built.
        cross: the two loaded state dicts compared (``None`` with one side).
        cross_roles: which side is A and which is B in ``cross``.
        mapping: ``(source, name)`` of the mapping, if any.
        tolerance: the tolerance of the cross comparison (round trips are bitwise).
        cast, strict: the options used.
        not_installed: the reference that could not be imported because its package is absent.
        cross_error: why the loaded state dicts could not be compared, if they could not.
        notes: what the reader should know.

    Example:
        >>> from tensorparity.checks._loadcheck import load_check
        >>> from tensorparity.examples import reference_model
        >>> report = load_check(reference_model().state_dict(), model=reference_model)
        >>> report.verdict, report.exit_code
        ('passed', 0)
    """

    checkpoint: Side
    sides: tuple[LoadSide, ...]
    cross: DiffReport | None
    cross_roles: tuple[str, str] | None
    mapping: tuple[str, str] | None
    tolerance: Tolerance
    cast: bool = False
    strict: bool = True
    not_installed: NotInstalled | None = None
    cross_error: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return (all(s.passed for s in self.sides) and self.cross_error is None
                and (self.cross is None or self.cross.passed))

    @property
    def verdict(self) -> Literal["passed", "failed"]:
        return "passed" if self.passed else "failed"

    @property
    def exit_code(self) -> int:
        """0 passed, 1 a key, shape, dtype or value problem (errors raise instead: exit 2)."""
        return 0 if self.passed else 1

    def side(self, role: str) -> LoadSide | None:
        """The side of one role (``model`` or ``reference``), if it was checked."""
        return next((s for s in self.sides if s.role == role), None)

    def summary(self) -> str:
        """One line for humans.

        Example:
            >>> from tensorparity.checks._loadcheck import load_check
            >>> import torch
            >>> load_check({"weight": torch.ones(2, 2)}, model=torch.nn.Linear(2, 2)).summary()
            'failed: model (Linear): 1 missing key'
        """
        names = " and ".join(f"{s.role} ({s.model_class.rsplit('.', 1)[-1]})" for s in self.sides)
        local_only = (f"; reference package {self.not_installed.package!r} is not installed; checked the local side "
                      f"only") if self.not_installed else ""
        if self.passed:
            agree = f", and the loaded weights agree ({self.cross.verdict})" if self.cross is not None else ""
            strictly = "strictly " if all(s.strict for s in self.sides) else ""
            return f"passed: the checkpoint loads {strictly}into {names}{agree}{local_only}"
        parts = [f"{s.role} ({s.model_class.rsplit('.', 1)[-1]}): {', '.join(s.problems())}"
                 for s in self.sides if not s.passed]
        if self.cross_error:
            parts.append(f"loaded weights not compared ({self.cross_error})")
        elif self.cross is not None and not self.cross.passed:
            parts.append(f"loaded weights differ: {self.cross.summary().removeprefix('differs: ')}")
        return "failed: " + "; ".join(parts) + local_only

    # Machines
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.load-check/1", ...}`` (strict JSON)."""
        return jsonable({
            "schema": SCHEMA, "verdict": self.verdict, "passed": self.passed, "exit_code": self.exit_code,
            "summary": self.summary(), "checkpoint": self.checkpoint.to_dict(),
            "mapping": None if self.mapping is None else {"source": self.mapping[0], "name": self.mapping[1]},
            "tolerance": {"description": self.tolerance.describe(), **self.tolerance.to_dict()},
            "cast": self.cast, "strict": self.strict,
            "sides": [s.to_dict() for s in self.sides],
            "reference_not_installed": self.not_installed.to_dict() if self.not_installed else None,
            "cross": None if self.cross is None else self.cross.to_dict(),
            "cross_roles": None if self.cross_roles is None else {"a": self.cross_roles[0], "b": self.cross_roles[1]},
            "cross_error": self.cross_error,
            "notes": list(self.notes),
        })

    to_json = report_json

    # People
    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: the verdict first, then a column per side, then each side's problems
        and the comparison of the loaded weights; lists longer than ``top`` are folded."""
        return _render(self, top)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = report_text

    def __repr__(self) -> str:
        return f"<LoadCheckReport {self.checkpoint.source!r}: {self.summary()}>"


# ---------------------------------------------------------------------------------------------
# Rich rendering


def _count(n: int) -> str:
    return f"{n:,}" if n else "0"


def _side_rows(r: LoadCheckReport) -> tuple[list[str], list[list[str]]]:
    columns = [""] + [s.role for s in r.sides]

    def row(name: str, cell: Any) -> list[str]:
        return [name, *(printable(str(cell(s))) for s in r.sides)]

    def rt(s: LoadSide) -> str:
        if s.round_trip is None:
            return "not checked"
        return "exact" if s.round_trip.verdict == "identical" else s.round_trip.summary()

    rows = [row("factory", lambda s: s.factory), row("class", lambda s: s.model_class.rsplit(".", 1)[-1]),
            row("route", lambda s: s.route_text),
            row("load_state_dict", lambda s: "raised: " + s.error if s.error else
                ("strict=True ✓" if s.strict else f"strict=False ({s.loaded:,} of {s.expected:,} keys)")),
            row("keys", lambda s: f"{s.loaded:,} loaded / {s.expected:,} expected / {s.offered:,} offered")]
    for kind, name in (("missing", "missing"), ("unexpected", "unexpected"), ("shape", "shape mismatches"),
                       ("dtype", "dtype mismatches")):
        rows.append(row(name, lambda s, k=kind: _count(len(s.of_kind(k)))))  # type: ignore[misc]
    if any(s.of_kind("kind") for s in r.sides):
        rows.append(row("not tensors", lambda s: _count(len(s.of_kind("kind")))))
    if r.cast:
        rows.append(row("cast", lambda s: _count(len(s.cast))))
    if any(s.ignored for s in r.sides):
        rows.append(row("ignored by mapping", lambda s: _count(len(s.ignored))))
    rows += [row("parameters", lambda s: f"{s.parameters:,} ({s.trainable:,} trainable)"),
             row("buffers", lambda s: f"{s.buffers:,} elements"), row("round trip", rt),
             row("result", lambda s: "passed" if s.passed else "FAILED")]
    return columns, rows


def _issue_rows(issues: tuple[KeyIssue, ...], top: int) -> list[list[str]]:
    rows = []
    for i in issues[:top]:
        extra = [f"from {', '.join(i.origin[:3])}" + (" …" if len(i.origin) > 3 else "")] if i.origin else []
        rows.append([printable(i.key), i.checkpoint or "—", i.model or "—",
                     printable("; ".join(extra + ([i.note] if i.note else [])))])
    return rows


def _header(r: LoadCheckReport) -> list[tuple[str, str]]:
    c = r.checkpoint
    text = f"{printable(c.source)}  ({c.format}, {plural(c.tensors, 'tensor')}, {c.counts.describe()})"
    rows = [("checkpoint", text + (f"  [{printable(c.selected)}]" if c.selected else ""))]
    if r.mapping:
        rows.append(("mapping", f"{printable(r.mapping[0])}  ({printable(r.mapping[1])})"))
    if r.not_installed:
        rows.append(("reference", f"{printable(r.not_installed.factory)}: package {r.not_installed.package!r} is not "
                                  f"installed; checked the local side only"))
    rows.append(("tolerance", f"{r.tolerance.describe()}; round trips bitwise"))
    options = [o for o, on in (("--cast", r.cast), ("--no-strict", not r.strict)) if on]
    if options:
        rows.append(("options", " ".join(options)))
    return rows


def _render(r: LoadCheckReport, top: int) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [Text(r.summary(), style="bold green" if r.passed else "bold red"), Text(),
                                   rich_header(_header(r)), Text()]
    columns, rows = _side_rows(r)
    parts += rich_titled_table("Sides", columns, rows, left=tuple(columns))
    for s in r.sides:
        for kind in ("missing", "unexpected", "shape", "dtype", "kind"):
            issues = s.of_kind(kind)  # type: ignore[arg-type]
            if issues:
                parts += [Text(), *rich_titled_table(f"{s.role}: {_KIND_TITLE[kind]} ({len(issues):,})",
                                                     ["key", "checkpoint", "model", "note"], _issue_rows(issues, top),
                                                     total=len(issues), hint=_HINT,
                                                     left=("key", "checkpoint", "model", "note"))]
        if s.round_trip is not None and not s.round_trip.passed:
            bad = [t for t in s.round_trip.tensors if not t.passed]
            parts += [Text(), *rich_comparisons(f"{s.role}: state_dict() after loading differs from what was "
                                                f"loaded", bad, top=top, hint=_HINT)]
    if r.cross is not None:
        a, b = r.cross_roles or ("A", "B")
        parts += [Text(), Text(f"Loaded weights, {a} (A) vs {b} (B)"
                               + (" through the mapping" if r.cross.mapping else ""), style="bold"),
                  Text(r.cross.classic_summary(), style="green" if r.cross.passed else "red")]
        if r.cross.mismatches:
            parts += rich_comparisons("Value mismatches, worst first", r.cross.mismatches, top=top, hint=_HINT,
                                      origins=r.cross.origins)
        for title, keys in (("Only in A", r.cross.only_in_a), ("Only in B", r.cross.only_in_b),
                            ("Shape mismatches", [t.key for t in r.cross.shape_mismatches])):
            if keys:
                names = [printable(k if isinstance(k, str) else k.key) for k in keys]
                shown = ", ".join(names[:top]) + (f" {fold_count(top, len(names), _HINT)}" if len(names) > top else "")
                parts.append(Text(f"{title} ({len(names):,}): {shown}"))
    if r.cross_error:
        parts += [Text(), Text(f"Loaded weights not compared: {printable(r.cross_error)}", style="red")]
    parts += [Text()] if r.notes else []
    parts += [Text(f"note: {printable(n)}", style="dim") for n in r.notes]
    return Group(*parts)
