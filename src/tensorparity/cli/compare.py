"""``tensorparity compare A B``: two traces layer by layer, or a trace and a live model (a
``module:function`` factory run on the trace's recorded input). Exit 0 same, 1 differs, 2 error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tensorparity.cli._common import check_output, command, emit_json, save_found_mapping, stdout_console
from tensorparity.cli._options import (
    TOP,
    AtolOption,
    ExactOption,
    HtmlOption,
    JsonOption,
    MapOption,
    NanUnequalOption,
    NoiseFloorOption,
    OverwriteOption,
    RtolOption,
    SaveMapOption,
    StatisticOption,
    TolOption,
    TopOption,
    check_top,
    parse_tolerance,
)

__all__ = ["compare_command"]


@command
def compare_command(
    a: Annotated[str, typer.Argument(metavar="A", help="First trace folder (A, usually the reference); TRACE@N "
                                                       "picks rank N of a multi-process trace.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Second trace folder (B; TRACE@N picks rank N), or a model "
                                                       "(MODEL: a factory, .nemo file or Hugging Face folder) run "
                                                       "live on A's recorded input (its backward starts from A's "
                                                       "recorded output gradient).", show_default=False)],
    map_: MapOption = None,
    align: Annotated[str, typer.Option("--align", metavar="auto|name|mapping|order",
                                       help="Pair layers by name, through --map, or by execution order and shapes "
                                            "(auto: --map if given, else names if they agree, else order).")
                     ] = "auto",
    exact: ExactOption = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    statistic: StatisticOption = "elementwise",
    nan_unequal: NanUnequalOption = False,
    tol: TolOption = None,
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
    json_: JsonOption = False,
    top: TopOption = TOP,
    noise_floor: NoiseFloorOption = False,
    save_map: SaveMapOption = None,
    overwrite: OverwriteOption = False,
    html_: HtmlOption = None,
) -> None:
    """Compare two traces layer by layer, forward and backward; name the first diverging layer.

    Prints the summary and the classic line, then the first divergence and every mismatched
    layer (introduced or inherited), then the rest folded. Multi-process traces (rank-N
    folders, written under torchrun) are compared rank by rank unless a rank is picked (A@0
    B@1, --rank-a/--rank-b, --rank): a per-rank table, then the worst rank's full report.
    --map renames A's layers into B's and transforms parameter gradients; --tol matches record
    keys (module/call/kind/path, e.g. '/grad_input/=1e-4'); --noise-floor judges each layer by
    the float32 noise measured when A was captured (capture --noise-floor). The HTML report
    plots the per-layer error beside a filterable table. --json prints schema
    tensorparity.trace-compare/1. Exit code: 0 the runs are the same (identical, or within
    tolerance; on every rank), 1 they differ (or their inputs do), 2 error.
    """
    from tensorparity import compare_traces
    from tensorparity._factory import build_model, carries_model
    from tensorparity._output import write_text

    check_top(top)
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
