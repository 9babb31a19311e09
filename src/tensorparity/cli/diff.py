"""``tensorparity diff A B``: are two checkpoints numerically the same? Exit 0 same, 1 differs, 2 error."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import (
    TOP,
    AtolOption,
    ExactOption,
    ExcludeOption,
    IncludeOption,
    JsonOption,
    MapOption,
    NanUnequalOption,
    RtolOption,
    StatisticOption,
    TolOption,
    TopOption,
    WeightsOnlyOption,
    check_top,
    joined_pattern,
    parse_tolerance,
)

__all__ = ["diff_command", "parse_tolerance"]


@command
def diff_command(
    a: Annotated[str, typer.Argument(metavar="A", help="First checkpoint (A): any file or folder tensorparity.open "
                                                       "reads.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Second checkpoint (B).", show_default=False)],
    map_: MapOption = None,
    exact: ExactOption = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    statistic: StatisticOption = "elementwise",
    nan_unequal: NanUnequalOption = False,
    tol: TolOption = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    weights_only: WeightsOnlyOption = None,
    include_records: Annotated[bool, typer.Option(
        "--include-records", help="Compare tensorparity's own migration records too (left out by default).")] = False,
    json_: JsonOption = False,
    top: TopOption = TOP,
) -> None:
    """Compare two checkpoints key by key, across formats (and, with --map, across implementations).

    Prints the classic summary line, then the worst mismatches first. --include/--exclude match
    A's keys. --json prints schema tensorparity.diff/1. Exit code: 0 the two are the same
    (identical, or within tolerance), 1 they differ, 2 error.
    """
    from tensorparity import diff

    check_top(top)
    tolerance = parse_tolerance(exact=exact, atol=atol, rtol=rtol, statistic=statistic, nan_unequal=nan_unequal,
                                overrides=tol)
    report = diff(a, b, mapping=map_, tolerance=tolerance, include=joined_pattern(include),
                  exclude=joined_pattern(exclude), weights_only=weights_only, include_records=include_records)
    finish(report, json_=json_, top=top)
