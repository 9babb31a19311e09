"""Renderings of a :class:`~tensorparity.resume._resume_report.ResumeReport`: rich (terminal) and HTML."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from tensorparity.report._render import (
    distinct,
    fold_count,
    html_style,
    html_table,
    plural,
    printable,
    rich_header,
    rich_titled_table,
    wrapped,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

    from tensorparity.resume._resume_report import Finding, ResumeLeg, ResumeReport, StepRow

__all__ = ["html_report", "rich_report"]

_HINT = "--top N shows more, --json lists all"
_ISOLATION = {"fork": "every leg in a fresh process forked from a server that only imported torch",
              "spawn": "every leg in a new Python interpreter"}


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def _loss_cells(r: StepRow) -> tuple[str, str]:
    if r.loss_a is None or r.loss_b is None or r.loss_same:
        return _f(r.loss_a), _f(r.loss_b)
    return distinct(r.loss_a, r.loss_b)


def _match_cell(r: StepRow) -> str:
    if r.match:
        return "✓"
    parts = []
    for what in r.differences():
        if what == "parameters":
            parts.append(f"parameters ({r.n_params_differing}/{r.n_params})")
        elif what == "batch" and r.batch_b_from is not None:
            parts.append(f"batch (got step {r.batch_b_from}'s)")
        else:
            parts.append(what)
    return "✗ " + ", ".join(parts)


def _rows(leg: ResumeLeg, top: int) -> tuple[list[list[str]], int]:
    rows = list(leg.rows)
    # Keep the first divergence in view however long the table: show from a little before it.
    first = next((i for i, r in enumerate(rows) if not r.match), 0)
    context = min(2, max(0, top - 1) // 2)
    begin = max(0, min(first - context, len(rows) - top))
    shown = rows[begin:begin + top]
    out = []
    for r in shown:
        a, b = _loss_cells(r)
        out.append([str(r.step), f"{r.epoch}:{r.batch}", a, b, _match_cell(r)])
    return out, len(rows)


def _header(r: ResumeReport) -> list[tuple[str, str]]:
    per = f", {r.steps_per_epoch} per epoch" if r.steps_per_epoch else ""
    acc = f", {r.accumulate} micro-batches per optimizer step" if r.accumulate > 1 else ""
    return [("recipe", printable(r.recipe)), ("steps", f"{r.steps}{per}{acc}"),
            ("checkpoint", r.checkpoint), ("tolerance", f"{r.profile}: {r.tolerance.describe()}"),
            ("uninterrupted", r.reference), ("processes", _ISOLATION.get(r.isolation, r.isolation))]


def _finding_line(f: Finding) -> str:
    tag = {True: "  [confirmed]", False: "  [not confirmed]", None: ""}[f.confirmed]
    return f"{f.message}{tag}"


def rich_report(r: ResumeReport, top: int) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [rich_header(_header(r)),
                                   wrapped(r.summary(), "bold green" if r.passed else "bold red")]
    for leg in r.legs:
        status = "✓ matches" if leg.passed else "✗ differs"
        parts.append(Text(f"\n{leg.label}: {status}", style="bold green" if leg.passed else "bold red"))
        rows, total = _rows(leg, top)
        parts += rich_titled_table("Steps (uninterrupted vs resumed)",
                                   ["step", "epoch:batch", "loss uninterrupted", "loss resumed", "match"], rows,
                                   total=total, hint=_HINT, left=("epoch:batch", "match"))
        for seg in leg.segments:
            head = f"Audit right after loading the checkpoint of step {seg.start}"
            if not seg.findings:
                parts.append(Text(f"{head}: every component equals the uninterrupted run", style="green"))
            else:
                verb = "differs" if len(seg.findings) == 1 else "differ"
                parts.append(Text(f"{head}: {plural(len(seg.findings), 'component')} {verb}", style="bold"))
                parts += [wrapped("✗ " + _finding_line(f), "red", indent=2) for f in seg.findings]
            if seg.end:
                parts.append(Text(f"State after step {seg.stop}", style="bold"))
                parts += [wrapped("✗ " + _finding_line(f), "red", indent=2) for f in seg.end]
            if seg.divergence:
                parts.append(wrapped(f"First divergence: {seg.divergence.message}", "bold red"))
            parts += [wrapped(f"note: {n}", "dim") for n in seg.notes]
        if leg.confirmations:
            parts.append(Text("Confirmation (re-run with components taken from the uninterrupted run)", style="bold"))
            parts += [wrapped(("✓ " if c.passed else "✗ ") + c.message, "green" if c.passed else "yellow", indent=2)
                      for c in leg.confirmations]
    parts += [wrapped(f"note: {n}", "dim") for n in r.notes]
    return Group(*parts)


def html_report(r: ResumeReport, top: int) -> str:
    e = html.escape
    head = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _header(r))
    out = [html_style("tp-resume"), "<div class='tp-resume'>", f"<table>{head}</table>",
           f"<div class='{'ok' if r.passed else 'bad'}'>{e(r.summary())}</div>"]
    for leg in r.legs:
        rows, total = _rows(leg, top)
        out.append(html_table(f"{leg.label}: {'matches' if leg.passed else 'differs'}",
                              ["step", "epoch:batch", "loss uninterrupted", "loss resumed", "match"], rows))
        if total > len(rows):
            out.append(f"<div class='d'>{e(fold_count(len(rows), total))}</div>")
        for seg in leg.segments:
            lines = [_finding_line(f) for f in (*seg.findings, *seg.end)]
            if seg.divergence:
                lines.append("first divergence: " + seg.divergence.message)
            out += [f"<div class='bad'>✗ {e(line)}</div>" for line in lines]
        out += [f"<div class='{'ok' if c.passed else 'd'}'>{e(c.message)}</div>" for c in leg.confirmations]
    out.append("</div>")
    return "".join(out)
