"""The records of a migration and their renderings: :class:`MigrationPlan` (what would run),
:class:`Change` (one key-level difference it makes) and :class:`MigrateReport` (what ran, what
was written, how it was verified); rich for people, JSON (schema ``tensorparity.migrate/1``) for
machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partialmethod
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import jsonable, plural, printable, rich_header, rich_titled_table

if TYPE_CHECKING:
    from rich.console import RenderableType

    from tensorparity.checks._diff_report import DiffReport

__all__ = ["PLAN_SCHEMA", "SCHEMA", "Change", "ChangeKind", "MigrateReport", "MigrationPlan", "PlanStep"]

SCHEMA = "tensorparity.migrate/1"
PLAN_SCHEMA = "tensorparity.migration-plan/1"
ChangeKind = Literal["renamed", "transformed", "added", "removed", "changed", "copied"]
_HINT = "--top N shows more, --json lists all"
_KIND_ORDER = ("renamed", "transformed", "copied", "added", "changed", "removed")


@dataclass(frozen=True)
class PlanStep:
    """One migration of a plan.

    Attributes:
        name, version: the migration's; ``version`` is where an ``up`` step arrives and a
            ``down`` step leaves.
        direction: ``up`` (an upgrade) or ``down`` (its inverse).
        kinds: ``mapping`` and/or ``function``.
        description: one line for humans.
    """

    name: str
    version: str
    direction: Literal["up", "down"]
    kinds: tuple[str, ...]
    description: str
    migration: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "direction": self.direction, "kinds": list(self.kinds),
                "description": self.description}


@dataclass(frozen=True)
class MigrationPlan:
    """What a checkpoint needs: its version, where it was read, and the migrations to the target.

    Example:
        >>> plan = MigrationPlan("ckpt.pt", "demo", None, "1.0", "field 'release'", "2.0",
        ...                      (PlanStep("split-qkv", "2.0", "up", ("mapping",), "split"),), ())
        >>> plan.direction, plan.summary()
        ('up', '1.0 -> 2.0: 1 migration (split-qkv 2.0)')
    """

    source: str
    registry: str
    registry_source: str | None
    version: str
    version_origin: str
    target: str
    steps: tuple[PlanStep, ...]
    history: tuple[dict[str, Any], ...]
    version_field: tuple[str, ...] = ()

    @property
    def direction(self) -> Literal["up", "down", "none"]:
        return self.steps[0].direction if self.steps else "none"

    @property
    def up_to_date(self) -> bool:
        return not self.steps

    def summary(self) -> str:
        """One line: from where to where, through which migrations."""
        if not self.steps:
            return f"already at {self.target}: nothing to do"
        names = ", ".join(f"{s.name} {s.version}" for s in self.steps)
        down = " (downgrade, through inverses)" if self.direction == "down" else ""
        return f"{self.version} -> {self.target}{down}: {plural(len(self.steps), 'migration')} ({names})"

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"schema": PLAN_SCHEMA, "source": self.source, "registry": self.registry,
                         "registry_source": self.registry_source, "version": self.version,
                         "version_origin": self.version_origin, "target": self.target, "direction": self.direction,
                         "summary": self.summary(), "steps": [s.to_dict() for s in self.steps],
                         "history": list(self.history), "version_field": list(self.version_field)})

    @property
    def exit_code(self) -> int:
        """Always 0: a plan says what would run and judges nothing."""
        return 0

    to_json = report_json

    def renderable(self, *, top: int = 10) -> RenderableType:
        """The checkpoint's version, where it was read, and every step of the plan (``top`` is
        ignored: a plan is listed whole)."""
        from rich.console import Group
        from rich.text import Text

        rows = [("checkpoint", printable(self.source)),
                ("registry", printable(self.registry) + (f"  ({printable(self.registry_source)})"
                                                         if self.registry_source else "")),
                ("version", f"{printable(self.version)}  (from {printable(self.version_origin)})"),
                ("target", printable(self.target))]
        if self.history:
            last = self.history[-1]
            rows.append(("history", f"{plural(len(self.history), 'migration run')} recorded; last "
                                    f"{printable(str(last.get('from')))} -> {printable(str(last.get('to')))} at "
                                    f"{printable(str(last.get('applied_at')))}"))
        parts: list[RenderableType] = [rich_header(rows)]
        if self.steps:
            table = [[s.version, printable(s.name), s.direction, " + ".join(s.kinds), printable(s.description)]
                     for s in self.steps]
            parts += [Text(), *rich_titled_table("Plan, in order", ["version", "migration", "direction", "kind",
                                                                    "what"], table,
                                                 left=("version", "migration", "direction", "kind", "what"))]
        return Group(*parts)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, trailing_newline=False)


@dataclass(frozen=True)
class Change:
    """One key-level difference a migration makes.

    Attributes:
        step: the migration that makes it.
        kind: renamed, transformed (made by a transform from ``sources``), copied (a tied weight),
            added, changed (a value or tensor replaced), removed.
        key: the key after the migration (the removed key for ``removed``).
        sources: the keys it was made from.
        detail: the transform, the old and new value, or the shape.
    """

    step: str
    kind: ChangeKind
    key: str
    sources: tuple[str, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "key": self.key, "sources": list(self.sources),
                "detail": self.detail}

    def text(self) -> str:
        """The change as one line: ``renamed a -> b``."""
        src = ", ".join(self.sources)
        if self.kind == "renamed":
            return f"{src} -> {self.key}"
        if self.kind in ("transformed", "copied"):
            return f"{src} -> {self.key}" + (f"  ({self.detail})" if self.detail else "")
        return self.key + (f"  ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class MigrateReport:
    """What :func:`tensorparity.migrate.migrate` did (or, in a dry run, would do).

    Attributes:
        plan: the plan it followed.
        changes: every key-level change, in plan order.
        dry_run: nothing was written.
        output: the file or folder written (``None``: a dry run, or nothing to do).
        in_place: the output replaced the input.
        backup: where the original was kept, if asked.
        format: the format written.
        record: the history entry recorded inside the output.
        verification: the output re-opened and compared bitwise with the plan (untouched
            tensors with the source, made ones with their recomputation).
        untouched, made: tensors written as they were in the source / made by a migration.
        seconds: wall time.
        notes: what the user should know.
    """

    plan: MigrationPlan
    changes: tuple[Change, ...] = ()
    dry_run: bool = False
    output: str | None = None
    in_place: bool = False
    backup: str | None = None
    format: str | None = None
    record: dict[str, Any] | None = None
    verification: DiffReport | None = field(default=None, repr=False, compare=False)
    untouched: int = 0
    made: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> Literal["migrated", "dry run", "up to date"]:
        if self.plan.up_to_date:
            return "up to date"
        return "dry run" if self.dry_run else "migrated"

    @property
    def verified(self) -> bool | None:
        return None if self.verification is None else self.verification.verdict == "identical"

    @property
    def exit_code(self) -> int:
        return 0

    def counts(self) -> dict[str, int]:
        """How many changes of each kind."""
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.kind] = out.get(c.kind, 0) + 1
        return {k: out[k] for k in _KIND_ORDER if k in out}

    def summary(self) -> str:
        """One line: the verdict, versions, changes, and where the output went.

        Example:
            >>> plan = MigrationPlan("a.pt", "demo", None, "2.0", "field 'release'", "2.0", (), ())
            >>> MigrateReport(plan).summary()
            'up to date: a.pt is already at 2.0, nothing was written'
        """
        if self.plan.up_to_date:
            return f"up to date: {self.plan.source} is already at {self.plan.target}, nothing was written"
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "no key changes"
        head = f"{self.plan.version} -> {self.plan.target} through {plural(len(self.plan.steps), 'migration')}: {counts}"
        if self.dry_run:
            return f"dry run: {head}; nothing was written"
        where = "in place" + (f" (original kept as {self.backup})" if self.backup else "") if self.in_place \
            else f"to {self.output}"
        check = {True: "verified bitwise", False: "VERIFICATION FAILED", None: "not verified"}[self.verified]
        return f"migrated {head}; written {where}; {check}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.migrate/1", ...}``."""
        verification = None
        if self.verification is not None:
            verification = {"verdict": self.verification.verdict, "summary": self.verification.classic_summary(),
                            "untouched_tensors": self.untouched, "made_tensors": self.made}
        return jsonable({
            "schema": SCHEMA, "verdict": self.verdict, "exit_code": self.exit_code, "summary": self.summary(),
            "dry_run": self.dry_run, "output": self.output, "in_place": self.in_place, "backup": self.backup,
            "format": self.format, "plan": self.plan.to_dict(), "counts": self.counts(),
            "changes": [c.to_dict() for c in self.changes], "record": self.record, "verified": self.verified,
            "verification": verification, "seconds": round(self.seconds, 3), "notes": list(self.notes)})

    to_json = report_json

    def renderable(self, *, top: int = 10) -> RenderableType:
        """The verdict first, then the plan, the changes (grouped by kind, ``top`` each) and the
        verification."""
        from rich.console import Group
        from rich.text import Text

        style = {"migrated": "bold green", "dry run": "bold yellow", "up to date": "bold green"}[self.verdict]
        if self.verified is False:
            style = "bold red"
        parts: list[RenderableType] = [Text(printable(self.summary()), style=style), Text(), self.plan.renderable()]
        title = "Would change" if self.dry_run else "Changed"
        for kind, rows in _grouped(self.changes).items():
            n = sum(1 for c in self.changes if c.kind == kind)
            parts += [Text(), *rich_titled_table(f"{title}: {kind} ({n:,})", ["migration", "key"], rows[:top],
                                                 total=len(rows), hint=_HINT, left=("migration", "key"))]
        if self.output is not None or self.verification is not None:
            rows = []
            if self.output is not None:
                rows.append(("written", f"{printable(self.output)} ({self.format})"
                             + ("  in place" if self.in_place else "")))
            if self.backup:
                rows.append(("backup", printable(self.backup)))
            if self.verification is not None:
                rows.append(("verified", f"{self.untouched:,} untouched tensors bitwise equal to the source, "
                                         f"{self.made:,} made tensors equal to their recomputation; "
                                         f"{self.verification.classic_summary()}"))
            if self.record is not None:
                rows.append(("recorded", f"inside the output: {self.record.get('registry')} "
                                         f"{self.record.get('from')} -> {self.record.get('to')}, source sha256 "
                                         f"{str((self.record.get('source') or {}).get('sha256'))[:16]}…"))
            parts += [Text(), rich_header(rows)]
        parts += [Text(f"note: {printable(n)}", style="dim") for n in self.notes]
        return Group(*parts)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, trailing_newline=False)

    def __repr__(self) -> str:
        return f"<MigrateReport {self.plan.source!r}: {self.summary()}>"


def _grouped(changes: tuple[Change, ...]) -> dict[str, list[list[str]]]:
    """Rows per kind, in display order; keys made from the same sources by the same step share a
    row (``qkv.weight -> q_proj.weight, k_proj.weight, v_proj.weight``)."""
    groups: dict[tuple[str, str, tuple[str, ...], str], list[str]] = {}
    for c in changes:
        if c.kind in ("transformed", "copied"):
            groups.setdefault((c.kind, c.step, c.sources, c.detail), []).append(c.key)
        else:
            groups[(c.kind, c.step, (c.key,), str(len(groups)))] = [c.text()]
    out: dict[str, list[list[str]]] = {}
    for kind in _KIND_ORDER:
        for (k, step, sources, detail), keys in groups.items():
            if k != kind:
                continue
            text = keys[0] if kind not in ("transformed", "copied") else \
                f"{', '.join(sources)} -> {', '.join(keys)}" + (f"  ({detail})" if detail else "")
            out.setdefault(kind, []).append([printable(step), printable(text)])
    return out
