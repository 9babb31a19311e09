"""``tensorparity replay REF_TRACE --model pkg:factory``: every layer's own error, free of upstream
error. Exit 0 every replayed layer matches, 1 some differ (or nothing could be replayed), 2 error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tensorparity.cli._common import check_output, command, finish, save_found_mapping
from tensorparity.cli.diff import parse_tolerance
from tensorparity.errors import UsageError

__all__ = ["replay_command"]


@command
def replay_command(
    reference: Annotated[str, typer.Argument(help="The reference trace folder, captured with --inputs.",
                                             show_default=False)],
    model: Annotated[str, typer.Option("--model", metavar="pkg.module:factory", show_default=False,
                                       help="The implementation to check: module:function, module:Class or "
                                            "file.py:function returning the nn.Module, or a .nemo file or a "
                                            "Hugging Face model folder (config.json).")],
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", metavar="CKPT",
                                                   help="Load these weights into the model (strict).")] = None,
    map_: Annotated[str | None, typer.Option("--map", "-m", metavar="MAP.yaml",
                                             help="Mapping from the reference's parameter keys to the model's: "
                                                  "renames the reference's modules into the model's.")] = None,
    noise_floor: Annotated[bool, typer.Option("--noise-floor", help="Also replay each module in float64 and "
                                              "judge it by 3x its own measured float32 error (not a guessed "
                                              "atol).")] = False,
    factor: Annotated[float, typer.Option("--factor", metavar="X",
                                          help="With --noise-floor: the multiple of the measured error "
                                               "allowed.")] = 3.0,
    atol: Annotated[float | None, typer.Option("--atol", metavar="X",
                                               help="Absolute tolerance (default: torch.testing's per dtype).")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", metavar="Y",
                                               help="Relative tolerance (default: torch.testing's per dtype).")] = None,
    tol: Annotated[list[str] | None, typer.Option("--tol", metavar="REGEX=ATOL[,RTOL]",
                                                  help="Tolerance for reference record keys matching REGEX; "
                                                       "repeatable, first match wins.")] = None,
    save_map: Annotated[Path | None, typer.Option("--save-map", metavar="MAP.yaml",
                                                  help="Without --map: write the mapping replay found from the "
                                                       "reference's parameters and the model's (YAML).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --save-map replace an existing "
                                            "file.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema "
                                        "tensorparity.trace-replay/1) and nothing else.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Skipped layers listed before folding.")] = 10,
) -> None:
    """Call every module of --model alone on the inputs the reference trace recorded for its
    partner, and compare what it returns with the partner's recorded output.

    Prints the layers with their own error first (leaf-most; a parent that only contains a
    mismatched child says so), then every replayed layer in execution order, then the skipped ones.
    """
    from tensorparity._factory import build_model
    from tensorparity.cli.capture import _load_checkpoint
    from tensorparity.trace._replay import replay

    if top < 0:
        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")
    if not factor > 0:
        raise UsageError(f"--factor must be > 0, not {factor}", fix="pass e.g. --factor 3")
    tolerance = parse_tolerance(atol=atol, rtol=rtol, overrides=tol)
    if save_map is not None:
        check_output(save_map, [reference], overwrite, what="the mapping")
    built = build_model(model)
    if checkpoint is not None:
        _load_checkpoint(built.model, checkpoint)
    report = replay(reference, built.model, mapping=map_, tolerance=tolerance, noise_floor=noise_floor,
                    factor=factor)
    save_found_mapping(report, save_map)
    finish(report, json_=json_, top=top)
