"""What :func:`tensorparity.trace.compare_traces` returns for multi-process traces compared on all
their ranks: one :class:`~tensorparity.trace._trace_report.TraceReport` per rank, one verdict (the worst),
one exit code. Rendered as a per-rank table (rank, verdict, mismatched layers, first divergence)
followed by the worst rank's full report; JSON schema ``tensorparity.trace-compare-ranks/1`` holds
every rank's report (each ``tensorparity.trace-compare/1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.report import Unbroken, render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import (
    html_table,
    jsonable,
    plural,
    printable,
    rich_header,
    rich_titled_table,
    wrapped,
)
from tensorparity.trace._trace_report import TraceReport, Verdict
from tensorparity.trace._trace_report_html import render_trace_html

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "Pairing", "RankComparison", "RankedTraceReport"]

SCHEMA = "tensorparity.trace-compare-ranks/1"
Pairing = Literal["rank by rank", "each rank of A", "each rank of B"]

# Worst last: a rank that could not be compared, or was fed other data, outranks one that differs.
_SEVERITY: dict[str, int] = {"identical": 0, "close": 1, "differs": 2, "inputs differ": 3, "nothing compared": 4}
_STYLE = {"identical": "bold green", "close": "bold green", "differs": "bold red", "inputs differ": "bold red",
          "nothing compared": "bold red"}


@dataclass(frozen=True)
class RankComparison:
    """One rank compared: ``rank`` is the rank of the multi-process side(s); ``rank_a`` / ``rank_b``
    each side's rank (``None`` for the one-trace side of an each-rank comparison)."""

    rank: int
    rank_a: int | None
    rank_b: int | None
    report: TraceReport

    @property
    def first_divergence_text(self) -> str:
        """``forward at blocks.1.act (GELU), introduced``; empty when none."""
        r = self.report
        if r.verdict in ("inputs differ", "nothing compared"):
            return r.verdict
        x = r.first_divergence
        if x is None:
            return ""
        return (f"{x.direction} at {x.label} ({printable(x.type_a.rsplit('.', 1)[-1])}), "
                f"{x.origin or 'introduced'}")

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {"rank": self.rank, "rank_a": self.rank_a, "rank_b": self.rank_b, "verdict": r.verdict,
                "passed": r.passed, "mismatched": len(r.mismatched), "summary": r.summary(), "report": r.to_dict()}


@dataclass(frozen=True)
class RankedTraceReport:
    """Two multi-process traces compared rank by rank, or one trace against each rank of another.

    Attributes:
        a, b: where the two sides came from (folders, or a description of what was given).
        pairing: ``rank by rank`` (rank r of A against rank r of B), ``each rank of B`` (A, one
            trace, against every rank of B) or ``each rank of A``.
        world_size: how many ranks were compared.
        ranks: one :class:`RankComparison` per rank, in rank order.

    Example:
        >>> report = compare_traces("ddp-a", "ddp-b")  # doctest: +SKIP
        >>> report.verdict, report.worst.rank, report[1].first_divergence  # doctest: +SKIP
    """

    a: str
    b: str
    pairing: Pairing
    world_size: int
    ranks: tuple[RankComparison, ...]

    def __getitem__(self, rank: int) -> TraceReport:
        """The report of one rank."""
        for x in self.ranks:
            if x.rank == rank:
                return x.report
        raise KeyError(f"no rank {rank} (ranks {', '.join(str(x.rank) for x in self.ranks)})")

    @property
    def reports(self) -> tuple[TraceReport, ...]:
        return tuple(x.report for x in self.ranks)

    @property
    def worst(self) -> RankComparison:
        """The rank that decides the verdict; of equally bad ones, the one that differs earliest
        (forward before backward), then the one with the most mismatched layers, then the lowest."""
        def badness(x: RankComparison) -> tuple[int, bool, int, int]:
            first = x.report.first_divergence
            forward = first is not None and first.direction == "forward"
            return _SEVERITY[x.report.verdict], forward, len(x.report.mismatched), -x.rank

        return max(self.ranks, key=badness)

    @property
    def failing(self) -> tuple[RankComparison, ...]:
        """The ranks whose runs are not the same."""
        return tuple(x for x in self.ranks if not x.report.passed)

    @property
    def verdict(self) -> Verdict:
        return self.worst.report.verdict

    @property
    def passed(self) -> bool:
        return all(x.report.passed for x in self.ranks)

    @property
    def exit_code(self) -> int:
        """0 when every rank is the same (identical or close), 1 otherwise."""
        return 0 if self.passed else 1

    @property
    def first_divergence(self) -> Any:
        """The worst rank's first diverging layer (``None`` when it has none)."""
        return self.worst.report.first_divergence

    @property
    def found_mapping(self) -> Any:
        """The mapping compare found from the traces' parameters (the worst rank's), if any."""
        return self.worst.report.found_mapping

    @property
    def _rank_word(self) -> str:
        return {"rank by rank": "rank", "each rank of A": "rank of A", "each rank of B": "rank of B"}[self.pairing]

    def summary(self) -> str:
        """One line: the verdict, which ranks, and the worst rank's own summary."""
        n = len(self.ranks)
        if self.passed:
            kinds = sorted({x.report.verdict for x in self.ranks}, key=_SEVERITY.__getitem__)
            detail = "" if len(kinds) == 1 else " (" + ", ".join(
                f"{v} on rank {', '.join(str(x.rank) for x in self.ranks if x.report.verdict == v)}"
                for v in kinds) + ")"
            return f"{self.verdict} on all {plural(n, 'rank')}{self._of}{detail}"
        bad, worst = self.failing, self.worst
        own = worst.report.summary().removeprefix(f"{self.verdict}: ")
        return (f"{self.verdict} on {len(bad)} of {plural(n, 'rank')}{self._of} (rank "
                f"{', '.join(str(x.rank) for x in bad)}); rank {worst.rank}: {own}")

    @property
    def _of(self) -> str:
        return {"rank by rank": "", "each rank of A": " of A", "each rank of B": " of B"}[self.pairing]

    def classic_summary(self) -> str:
        """``Ranks: 2 / Same: 1 / Different: 1 / Worst: rank 1 → differs``."""
        same = sum(x.report.passed for x in self.ranks)
        return (f"Ranks: {len(self.ranks)} / Same: {same} / Different: {len(self.ranks) - same} / "
                f"Worst: rank {self.worst.rank}{self._of} → {self.verdict}")

    # Machines
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.trace-compare-ranks/1", ...}``; ``ranks``
        holds every rank's full report."""
        return jsonable({
            "schema": SCHEMA, "verdict": self.verdict, "passed": self.passed, "exit_code": self.exit_code,
            "summary": self.summary(), "classic_summary": self.classic_summary(),
            "a": self.a, "b": self.b, "pairing": self.pairing, "world_size": self.world_size,
            "worst_rank": self.worst.rank, "failing_ranks": [x.rank for x in self.failing],
            "ranks": [x.to_dict() for x in self.ranks],
        })

    to_json = report_json

    # People
    def _table_rows(self) -> list[list[str]]:
        return [[str(x.rank), x.report.verdict, f"{len(x.report.mismatched):,}", printable(x.first_divergence_text)]
                for x in self.ranks]

    def _columns(self) -> list[str]:
        return [self._rank_word, "verdict", "mismatched layers", "first divergence"]

    def _header(self) -> list[tuple[str, str]]:
        ranks = plural(self.world_size, "rank")
        how = {"rank by rank": "rank by rank: each rank of A against the same rank of B",
               "each rank of B": "each rank: A, one trace, against every rank of B",
               "each rank of A": "each rank: every rank of A against B, one trace"}
        size_a = "one trace" if self.pairing == "each rank of B" else ranks
        size_b = "one trace" if self.pairing == "each rank of A" else ranks
        return [("A", f"{printable(self.a)}  ({size_a})"), ("B", f"{printable(self.b)}  ({size_b})"),
                ("compared", how[self.pairing])]

    def _worst_title(self) -> str:
        w = self.worst
        which = {"rank by rank": f"rank {w.rank}", "each rank of B": f"A against rank {w.rank} of B",
                 "each rank of A": f"rank {w.rank} of A against B"}[self.pairing]
        lead = "the worst" if len(self.ranks) > 1 else "the only one"
        return f"{which} ({lead}) in full:"

    def _head(self) -> list[RenderableType]:
        from rich.text import Text

        head: list[RenderableType] = [rich_header(self._header()), Text(), wrapped(self.summary()), Text()]
        head += rich_titled_table(f"Per rank ({len(self.ranks):,})", self._columns(), self._table_rows(),
                                  left=tuple(self._columns()[1:2] + self._columns()[3:]))
        head.append(Unbroken(Text(self.classic_summary(), style=_STYLE[self.verdict])))  # scripts grep for it
        head += [Text(), wrapped(self._worst_title(), "bold")]
        return head

    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: the per-rank table, then the worst rank's full report."""
        from rich.console import Group

        return Group(*self._head(), self.worst.report.renderable(top=top))

    def to_html(self) -> str:
        """One self-contained HTML page: the per-rank table above the worst rank's full report."""
        import html

        w = self.worst
        page = render_trace_html(w.report, title=f"tensorparity compare {self.a} vs {self.b} ({self.pairing})")
        section = (f"<h1>Ranks: {html.escape(self.verdict)}</h1><p>{html.escape(self.summary())}</p>"
                   f"<p>{html.escape(self._header()[-1][1])}</p>"
                   + html_table(f"Per rank ({len(self.ranks)})", self._columns(), self._table_rows())
                   + f"<h2>{html.escape(self._worst_title())}</h2>")
        return page.replace("<body>", "<body>" + section, 1)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = report_text

    def __repr__(self) -> str:
        return f"<RankedTraceReport {self.a!r} vs {self.b!r} ({self.pairing}): {self.classic_summary()}>"
