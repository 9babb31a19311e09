"""Which ranks of two traces :func:`~tensorparity.trace.compare_traces` pairs.

A trace captured under ``torchrun`` is a folder of ``rank-<r>/`` traces. A side's rank is chosen
by a ``@N`` suffix on its path (``run@1``; a path that really ends in ``@digits`` and exists is a
path), by ``rank_a`` / ``rank_b``, or by ``rank`` for both. Without one:

- both sides hold ranks: every rank of A against the same rank of B ("rank by rank");
- ``each_rank``: the one side that is a single trace (one process, one chosen rank, or a live
  model) against every rank of the other ("each rank of B", or "each rank of A").

A folder that ``Trace.open`` opens as one trace without a rank (a single ``rank-<r>/``, or ranks
it assembles into one) is one trace here too. A side compared on all its ranks is checked first,
all problems reported at once: ranks missing (``rank-0/`` and ``rank-2/`` of a world size of 3),
ranks of runs with different world sizes, and sides holding different ranks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tensorparity.checkpoint.tracefolder.format import MANIFEST, TraceError, rank_folders
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.errors import TensorParityError, UsageError
from tensorparity.trace._ranked_report import RankComparison, RankedTraceReport
from tensorparity.trace._trace_report import TraceReport

__all__ = ["RankPlan", "compare_ranks", "plan_ranks", "split_rank"]

_SUFFIX = re.compile(r"(.+)@(\d+)")
_PICK = "pass one rank per side: A@N / B@N (rank_a=N, rank_b=N; --rank-a/--rank-b), or rank=N (--rank N) for both"


def split_rank(source: Any) -> tuple[Any, int | None]:
    """``run@1`` -> ``(run, 1)``; a path that exists as written, or has no ``@N``, stays as it is.

    Example:
        >>> split_rank("no-such-run@1"), split_rank("run"), split_rank(3)
        (('no-such-run', 1), ('run', None), (3, None))
    """
    if not isinstance(source, (str, os.PathLike)):
        return source, None
    text = os.fspath(source)
    if not isinstance(text, str) or Path(text).exists():
        return source, None
    m = _SUFFIX.fullmatch(text)
    if m is None:
        return source, None
    base = m.group(1)
    return (Path(base) if isinstance(source, Path) else base), int(m.group(2))


@dataclass
class RankPlan:
    """What to compare: one pair (``pairs`` empty; ``a``/``b`` with ``rank_a``/``rank_b``), or
    ``pairs`` of opened traces (``(rank, a, b)``; :meth:`close` releases them)."""

    a: Any
    b: Any
    rank_a: int | None = None
    rank_b: int | None = None
    pairing: str = ""  # "rank by rank", "each rank of A", "each rank of B"
    world_size: int = 0
    pairs: list[tuple[int, Any, Any]] = field(default_factory=list)
    opened: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for t in self.opened:
            t.close()


def compare_ranks(plan: RankPlan, compare: Callable[[Any, Any], Any]) -> RankedTraceReport:
    """Each pair of the plan compared on its own (``compare(a, b)`` -> a ``TraceReport``); one
    report of them all. The traces the plan opened are closed."""
    try:
        done = []
        for r, ta, tb in plan.pairs:
            report: TraceReport = compare(ta, tb)
            done.append(RankComparison(r, None if plan.pairing == "each rank of B" else r,
                                       None if plan.pairing == "each rank of A" else r, report))
    finally:
        plan.close()
    return RankedTraceReport(_label(plan.a), _label(plan.b), plan.pairing,  # type: ignore[arg-type]
                             plan.world_size, tuple(done))


def _label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, nn.Module):
        return f"<live {type(source).__name__}>"
    return str(getattr(source, "path", None) or f"<{type(source).__name__} in memory>")


def _rank_of(name: str, suffix: int | None, own: int | None, both: int | None) -> int | None:
    given = [(how, v) for how, v in ((f"{name}@{suffix}", suffix), (f"rank_{name.lower()}={own} (--rank-{name.lower()})", own),
                                     (f"rank={both}", both)) if v is not None]
    for how, v in given:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(f"the rank of {name} must be a whole number >= 0, not {how}", fix=_PICK)
    values = {v for _, v in given}
    if len(values) > 1:
        raise UsageError(f"the rank of {name} is given twice, differently: {' and '.join(h for h, _ in given)}",
                         fix=_PICK)
    return values.pop() if values else None


def _ranks_of(source: Any) -> dict[int, Path]:
    """The rank folders of a multi-process trace folder that does not open as one trace; ``{}``
    for anything else."""
    if not isinstance(source, (str, os.PathLike)):
        return {}
    folder = Path(source)
    if not folder.is_dir() or (folder / MANIFEST).exists():
        return {}
    folders = rank_folders(folder)
    if len(folders) < 2:
        return folders
    try:  # ranks Trace.open assembles into one trace (DTensor shards) are one trace here too
        Trace.open(folder).close()
    except UsageError:  # "the trace holds N ranks": one trace per rank
        return folders
    except TensorParityError:  # a broken rank: named below, with the others' problems
        return folders
    return {}


def plan_ranks(a: Any, b: Any, *, rank: int | None, rank_a: int | None, rank_b: int | None,
               each_rank: bool) -> RankPlan:
    """Decide which ranks to compare; open and check every rank of a side compared on all of them.

    Raises:
        UsageError: a rank given twice differently; sides that cannot be paired (one trace
            against several ranks without ``each_rank``, different ranks on the two sides).
        TraceError: a side's ranks missing, or from runs of different world sizes.
    """
    a, suffix_a = split_rank(a)
    b, suffix_b = split_rank(b)
    ra, rb = _rank_of("A", suffix_a, rank_a, rank), _rank_of("B", suffix_b, rank_b, rank)
    folders_a = {} if ra is not None else _ranks_of(a)
    folders_b = {} if rb is not None else _ranks_of(b)
    multi = len(folders_a) > 1 or len(folders_b) > 1  # one folder alone opens as that rank, as Trace.open does
    if each_rank:
        if bool(folders_a) == bool(folders_b):
            held = "both A and B hold" if folders_a else "neither A nor B holds"
            raise UsageError(f"each_rank (--each-rank) compares one trace with every rank of a multi-process "
                             f"trace, and {held} ranks",
                             fix="drop --each-rank (two multi-process traces are compared rank by rank), or pick "
                                 "one side's rank with A@N" if folders_a else "drop --each-rank")
    elif multi and not (folders_a and folders_b):
        many, name, other = (folders_a, "A", "B") if folders_a else (folders_b, "B", "A")
        raise UsageError(f"{name} holds {len(many)} ranks ({_list(many)}) and {other} is one trace",
                         fix=f"pass --each-rank (each_rank=True) to compare {other} with every rank of {name}, "
                             f"or pick one rank: {name}@N")
    elif not multi:
        return RankPlan(a, b, ra, rb)
    plan = RankPlan(a, b)
    try:
        _open_ranks(plan, a, b, folders_a, folders_b, ra, rb)
    except BaseException:
        plan.close()
        raise
    return plan


def _open_ranks(plan: RankPlan, a: Any, b: Any, folders_a: dict[int, Path], folders_b: dict[int, Path],
                ra: int | None, rb: int | None) -> None:
    problems: list[TensorParityError] = []
    sides: dict[str, dict[int, Any]] = {}
    for name, source, folders in (("A", a, folders_a), ("B", b, folders_b)):
        if not folders:
            continue
        opened: dict[int, Any] = {}
        for r, folder in folders.items():
            try:
                opened[r] = Trace.open(folder, rank=r)  # also refuses a folder holding another rank
            except TensorParityError as exc:
                problems.append(exc.with_path(folder))
                continue
            plan.opened.append(opened[r])
        problems += _check_side(name, source, opened)
        sides[name] = opened
    if not problems and len(sides) == 2 and set(sides["A"]) != set(sides["B"]):
        problems.append(UsageError(
            f"A holds {len(sides['A'])} ranks ({_list(sides['A'])}) and B holds {len(sides['B'])} "
            f"({_list(sides['B'])}): rank by rank needs the same ranks on both sides",
            fix="compare one rank of each (A@N B@M, --rank-a/--rank-b), or capture both runs on as many ranks"))
    if problems:
        raise _together(problems)
    if len(sides) == 2:
        plan.pairing = "rank by rank"
        plan.pairs = [(r, sides["A"][r], sides["B"][r]) for r in sides["A"]]
    elif "B" in sides:
        plan.pairing = "each rank of B"
        single = _single(a, ra, plan)
        plan.pairs = [(r, single, t) for r, t in sides["B"].items()]
    else:
        plan.pairing = "each rank of A"
        single = _single(b, rb, plan)
        plan.pairs = [(r, t, single) for r, t in sides["A"].items()]
    plan.world_size = len(plan.pairs)


def _single(source: Any, rank: int | None, plan: RankPlan) -> Any:
    """The one-trace side of ``each_rank``, opened once (a path) or as given (a trace, a model)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    trace = Trace.open(source, rank=rank)
    plan.opened.append(trace)
    return trace


def _check_side(name: str, source: Any, opened: dict[int, Any]) -> Iterator[TensorParityError]:
    sizes = {r: t.provenance.get("world_size") for r, t in opened.items()}
    known = {s for s in sizes.values() if isinstance(s, int)}
    if len(known) > 1:
        said = ", ".join(f"rank {r}: {s}" for r, s in sizes.items() if s is not None)
        yield TraceError(f"trace {name}'s ranks come from captures of different world sizes ({said})", path=source,
                         fix="put the rank-<r> folders of one capture together (or capture again on every rank)")
        return
    world = known.pop() if known else (max(opened) + 1 if opened else 0)
    missing = [r for r in range(world) if r not in opened]
    extra = [r for r in opened if r >= world]
    if missing:
        yield TraceError(f"trace {name} was captured on {world} ranks but rank{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing))} {'are' if len(missing) > 1 else 'is'} missing (it holds rank {_list(opened)})",
                         path=source,
                         fix=f"copy rank-{missing[0]}/ from the capture that wrote the others (each rank writes its "
                             f"own folder), or compare one rank with {name}@N")
    if extra:
        yield TraceError(f"trace {name}'s rank {', '.join(map(str, extra))} lies outside its world size of {world}",
                         path=source, fix="put the rank-<r> folders of one capture together (or capture again on "
                                          "every rank)")


def _together(problems: list[TensorParityError]) -> TensorParityError:
    """Every problem in one error (of the first one's type); the fixes of all, each once."""
    if len(problems) == 1:
        return problems[0]
    fixes = list(dict.fromkeys(p.fix for p in problems if p.fix))
    message = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
    return type(problems[0])(message, fix="; ".join(fixes) or None)


def _list(ranks: Any) -> str:
    return ", ".join(map(str, sorted(ranks)))
