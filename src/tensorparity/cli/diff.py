"""``tensorparity diff A B``: are two checkpoints numerically the same? Exit 0 same, 1 differs, 2 error."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from tensorparity.checks._diff import diff
from tensorparity.cli._common import (
    AtolOption,
    ExactOption,
    NanUnequalOption,
    RtolOption,
    StatisticOption,
    command,
    finish,
)
from tensorparity.errors import UsageError
from tensorparity.numerics import Tolerance

__all__ = ["diff_command", "parse_tolerance"]

_STATISTICS = ("elementwise", "max", "mean")


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0) or math.isinf(value):
        raise UsageError(f"--tol {spec!r}: {what} {text!r} is not a number >= 0",
                         fix=r"write --tol 'REGEX=ATOL' or --tol 'REGEX=ATOL,RTOL', e.g. --tol '\.norm\.=1e-3,0'")
    return value


def parse_tolerance(
    *,
    exact: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    statistic: str = "elementwise",
    nan_unequal: bool = False,
    overrides: list[str] | None = None,
) -> Tolerance:
    """Build the :class:`Tolerance` the command-line options describe.

    ``overrides`` are ``'REGEX=ATOL[,RTOL]'`` strings (the last ``=`` separates the numbers, so
    the regex may hold ``=``); an override keeps the statistic and NaN rule of the whole, and
    loosens its keys out of ``exact`` mode.

    Example:
        >>> import torch
        >>> parse_tolerance(atol=1e-4, overrides=[r"\\.norm\\.=1e-2"]).for_key("a.norm.w", torch.float32).atol
        0.01
    """
    if statistic not in _STATISTICS:
        raise UsageError(f"--statistic {statistic!r} is not one of {', '.join(_STATISTICS)}",
                         fix="pass --statistic elementwise, --statistic max or --statistic mean")
    if exact and (atol is not None or rtol is not None):
        raise UsageError("--exact compares bytes, so --atol/--rtol would be ignored",
                         fix="drop --atol/--rtol, or drop --exact; --tol 'REGEX=ATOL' loosens single keys")
    parsed = []
    for spec in overrides or []:
        pattern, sep, numbers = spec.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--tol {spec!r} is not REGEX=ATOL[,RTOL]",
                             fix=r"write e.g. --tol '\.norm\.=1e-3' or --tol 'head\.=1e-3,1e-2'")
        parts = numbers.split(",")
        if len(parts) > 2:
            raise UsageError(f"--tol {spec!r} has {len(parts)} numbers after '='",
                             fix=r"give ATOL or ATOL,RTOL, e.g. --tol 'head\.=1e-3,1e-2'")
        o_atol = _number(parts[0], "atol", spec)
        o_rtol = _number(parts[1], "rtol", spec) if len(parts) == 2 else None
        parsed.append((pattern, Tolerance(atol=o_atol, rtol=o_rtol, equal_nan=not nan_unequal, statistic=statistic)))
    return Tolerance(atol=atol, rtol=rtol, exact=exact, equal_nan=not nan_unequal,
                     statistic=statistic, overrides=tuple(parsed))  # type: ignore[arg-type]


@command
def diff_command(
    a: Annotated[str, typer.Argument(help="First checkpoint (A): any file or folder tensorparity.open reads.",
                                     show_default=False)],
    b: Annotated[str, typer.Argument(help="Second checkpoint (B).", show_default=False)],
    map_: Annotated[str | None, typer.Option("--map", "-m", metavar="MAP.yaml",
                                             help="Mapping file: translate A's keys (and layouts) into B's.")] = None,
    exact: ExactOption = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    statistic: StatisticOption = "elementwise",
    nan_unequal: NanUnequalOption = False,
    tol: Annotated[list[str] | None, typer.Option("--tol", metavar="REGEX=ATOL[,RTOL]",
                                                  help="Tolerance for keys matching REGEX; repeatable, first match "
                                                       "wins.")] = None,
    include: Annotated[str | None, typer.Option("--include", "-i", metavar="REGEX",
                                                help="Compare only A's keys matching this regular expression.")] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", "-x", metavar="REGEX",
                                                help="Skip A's keys matching this regular expression.")] = None,
    weights_only: Annotated[bool | None, typer.Option(
        "--weights-only/--all-keys",
        help="Compare model weights only, or every key. Default: weights only when one side is a bare state "
             "dict and the other a Lightning/NeMo/training checkpoint.", show_default=False)] = None,
    include_records: Annotated[bool, typer.Option(
        "--include-records", help="Compare tensorparity's own migration records too (left out by default).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema tensorparity.diff/1) "
                                        "and nothing else.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Rows shown per list before folding.")] = 10,
) -> None:
    """Compare two checkpoints key by key, across formats (and, with --map, across implementations).

    Prints the classic summary line, then the worst mismatches first. Exit code: 0 the two are
    the same (identical, or within tolerance), 1 they differ, 2 error.
    """
    if top < 0:
        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")
    tolerance = parse_tolerance(exact=exact, atol=atol, rtol=rtol, statistic=statistic, nan_unequal=nan_unequal,
                                overrides=tol)
    report = diff(a, b, mapping=map_, tolerance=tolerance, include=include, exclude=exclude,
                  weights_only=weights_only, include_records=include_records)
    finish(report, json_=json_, top=top)
