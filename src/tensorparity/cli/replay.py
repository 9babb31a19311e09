"""``tensorparity replay REF MODEL``: every layer's own error, free of upstream error. Exit 0 every
replayed layer matches, 1 some differ (or nothing could be replayed), 2 error."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import check_output, command, finish, save_found_mapping
from tensorparity.cli._options import (
    TOP,
    AtolOption,
    CheckpointOption,
    JsonOption,
    MapOption,
    ModelArgument,
    ModelOption,
    NoiseFloorOption,
    OverwriteOption,
    RtolOption,
    SaveMapOption,
    TolOption,
    TopOption,
    check_top,
    one_model,
    parse_tolerance,
)

__all__ = ["replay_command"]


@command
def replay_command(
    reference: Annotated[str, typer.Argument(metavar="REF", help="The reference trace folder, captured with "
                                             "--inputs.", show_default=False)],
    model: ModelArgument = None,
    model_option: ModelOption = None,
    checkpoint: CheckpointOption = None,
    map_: MapOption = None,
    noise_floor: NoiseFloorOption = False,
    factor: Annotated[float, typer.Option("--factor", metavar="X",
                                          help="With --noise-floor: the multiple of the measured error "
                                               "allowed.")] = 3.0,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    tol: TolOption = None,
    save_map: SaveMapOption = None,
    overwrite: OverwriteOption = False,
    json_: JsonOption = False,
    top: TopOption = TOP,
) -> None:
    """Call every module of MODEL alone on the inputs the reference trace recorded for its
    partner, and compare what it returns with the partner's recorded output.

    Prints the layers with their own error first (leaf-most; a parent that only contains a
    mismatched child says so), then every replayed layer in execution order, then the skipped ones
    (--top of them). --map renames the reference's modules into the model's; --tol matches the
    reference's record keys; --noise-floor replays each module in float64 too and judges it by
    --factor times its own measured float32 error. --json prints schema tensorparity.trace-replay/1.
    """
    factory = one_model(model, model_option)
    from tensorparity import replay
    from tensorparity._factory import build_model
    from tensorparity.trace._capture_run import _load_checkpoint

    check_top(top)
    if not factor > 0:
        from tensorparity.errors import UsageError

        raise UsageError(f"--factor must be > 0, not {factor}", fix="pass e.g. --factor 3")
    tolerance = parse_tolerance(atol=atol, rtol=rtol, overrides=tol)
    if save_map is not None:
        check_output(save_map, [reference], overwrite, what="the mapping")
    built = build_model(factory)
    if checkpoint is not None:
        _load_checkpoint(built.model, checkpoint)
    report = replay(reference, built.model, mapping=map_, tolerance=tolerance, noise_floor=noise_floor,
                    factor=factor)
    save_found_mapping(report, save_map)
    finish(report, json_=json_, top=top)
