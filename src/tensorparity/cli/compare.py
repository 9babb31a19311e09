"""``tensorparity compare A B``: two traces layer by layer, or a trace and a live model (a
``module:function`` factory run on the trace's recorded input). Exit 0 same, 1 differs, 2 error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tensorparity._output import write_text
from tensorparity.cli._common import (
    AtolOption,
    ExactOption,
    NanUnequalOption,
    RtolOption,
    StatisticOption,
    check_output,
    command,
    emit_json,
    save_found_mapping,
    stdout_console,
)
from tensorparity.cli.diff import parse_tolerance
from tensorparity.errors import UsageError
from tensorparity.trace._compare import compare_traces

__all__ = ["compare_command"]


@command
def compare_command(
    a: Annotated[str, typer.Argument(help="First trace folder (A, usually the reference); TRACE@N picks rank N of "
                                          "a multi-process trace.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Second trace folder (B; TRACE@N picks rank N), or a model factory "
                                          "'pkg.module:function' / 'file.py:function' run live on A's recorded "
                                          "input (its backward starts from A's recorded output gradient).",
                                     show_default=False)],
    map_: Annotated[str | None, typer.Option("--map", "-m", metavar="MAP.yaml",
                                             help="Mapping from A's parameter keys to B's: renames A's layers into "
                                                  "B's and transforms parameter gradients.")] = None,
    align: Annotated[str, typer.Option("--align", metavar="auto|name|mapping|order",
                                       help="Pair layers by name, through --map, or by execution order and shapes "
                                            "(auto: --map if given, else names if they agree, else order).")
                     ] = "auto",
    exact: ExactOption = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    statistic: StatisticOption = "elementwise",
    nan_unequal: NanUnequalOption = False,
    tol: Annotated[list[str] | None, typer.Option("--tol", metavar="REGEX=ATOL[,RTOL]",
                                                  help="Tolerance for record keys (module/call/kind/path) matching "
                                                       "REGEX, e.g. '/grad_input/=1e-4'; repeatable, first match "
                                                       "wins.")] = None,
    margin: Annotated[float, typer.Option("--margin", metavar="X",
                                          help="A mismatched layer introduced its error when its relative error "
                                               "exceeds its input's X times.")] = 10.0,
    rank: Annotated[int | None, typer.Option("--rank", metavar="N", min=0,
                                             help="Which rank of multi-process traces to compare, on both sides "
                                                  "(without it: every rank of A against the same rank of B).")
                    ] = None,
    rank_a: Annotated[int | None, typer.Option("--rank-a", metavar="N", min=0,
                                               help="Rank N of A only (the same as A@N).")] = None,
    rank_b: Annotated[int | None, typer.Option("--rank-b", metavar="N", min=0,
                                               help="Rank N of B only (the same as B@N).")] = None,
    each_rank: Annotated[bool, typer.Option("--each-rank", help="Compare the side that is one trace (one process, "
                                            "a chosen rank, or a live model) with every rank of the other, "
                                            "multi-process trace.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema "
                                        "tensorparity.trace-compare/1) and nothing else.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Rows shown per list before folding.")] = 10,
    noise_floor: Annotated[bool, typer.Option("--noise-floor", help="Judge each layer by the float32 noise "
                                              "measured when A was captured (tensorparity capture "
                                              "--noise-floor): atol = 3x its float32-vs-float64 error.")] = False,
    save_map: Annotated[Path | None, typer.Option("--save-map", metavar="MAP.yaml",
                                                  help="Without --map: write the mapping compare found from the "
                                                       "traces' parameters (YAML, for review and reuse).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --save-map and --html replace an existing "
                                            "file (never an input).")] = False,
    html_: Annotated[Path | None, typer.Option("--html", metavar="PATH",
                                               help="Also write the report as one self-contained HTML file (plot "
                                                    "of per-layer error, filterable table; opens offline). "
                                                    "Written atomically; an existing file only with --overwrite.")] = None,
) -> None:
    """Compare two traces layer by layer, forward and backward; name the first diverging layer.

    Prints the summary and the classic line, then the first divergence and every mismatched
    layer (introduced or inherited), then the rest folded. Multi-process traces (rank-N
    folders, written under torchrun) are compared rank by rank unless a rank is picked (A@0
    B@1, --rank-a/--rank-b, --rank): a per-rank table, then the worst rank's full report.
    Exit code: 0 the runs are the same (identical, or within tolerance; on every rank), 1 they
    differ (or their inputs do), 2 error.
    """
    if top < 0:
        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")
    tolerance = parse_tolerance(exact=exact, atol=atol, rtol=rtol, statistic=statistic, nan_unequal=nan_unequal,
                                overrides=tol)
    inputs = [a, b, map_ if isinstance(map_, str) else None]
    if html_ is not None:
        check_output(html_, inputs, overwrite, what="the HTML report")
    if save_map is not None:
        check_output(save_map, inputs, overwrite, what="the mapping")
    if noise_floor:
        from tensorparity.trace._rank_plan import split_rank
        from tensorparity.trace.noise import recorded_noise_floor_of

        path_a, suffix = split_rank(a)
        chosen = next((r for r in (suffix, rank_a, rank) if r is not None), None)
        tolerance = recorded_noise_floor_of(path_a, chosen, base=tolerance)
    side_b: object = b
    from tensorparity._factory import build_model, carries_model

    if (not Path(b).exists() and ":" in b) or carries_model(b):  # a factory, a .nemo file or an HF folder
        side_b = build_model(b, role="model B").model
    report = compare_traces(a, side_b, mapping=map_, tolerance=tolerance, align=align,  # type: ignore[arg-type]
                            margin=margin, rank=rank, rank_a=rank_a, rank_b=rank_b, each_rank=each_rank)
    save_found_mapping(report, save_map)
    if html_ is not None:
        write_text(html_, report.to_html(), what="the HTML report")
    if json_:
        emit_json(report.to_json())
    else:
        console = stdout_console()
        report.render(console, top=top)
        if html_ is not None:
            console.print(f"HTML report: {html_}", soft_wrap=True)
    raise typer.Exit(report.exit_code)
