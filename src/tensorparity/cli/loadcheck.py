"""``tensorparity load-check CKPT MODEL [--reference MODEL] [--map M]``: does a checkpoint load
into the model, and into the reference, with the same values?
Exit 0 passed, 1 a key/shape/dtype/value problem, 2 error."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import (
    TOP,
    AtolOption,
    ExactOption,
    JsonOption,
    MapOption,
    ModelArgument,
    ModelOption,
    RtolOption,
    TopOption,
    check_top,
    one_model,
    parse_tolerance,
)

__all__ = ["load_check_command"]


@command
def load_check_command(
    checkpoint: Annotated[str, typer.Argument(metavar="CKPT", help="The checkpoint: any file or folder "
                                              "tensorparity.open reads (its model weights are loaded).",
                                              show_default=False)],
    model: ModelArgument = None,
    model_option: ModelOption = None,
    reference: Annotated[str | None, typer.Option("--reference", "-r", metavar="MODEL",
                                                  help="The reference model, given as MODEL is. A reference that "
                                                       "cannot be imported is an error (see --reference-optional).")
                          ] = None,
    reference_optional: Annotated[bool, typer.Option("--reference-optional", help="If the reference's package is not "
                                                     "installed, check the local side alone (and say so) instead of "
                                                     "failing.")] = False,
    map_: MapOption = None,
    cast: Annotated[bool, typer.Option("--cast", help="Load tensors of another dtype cast to the model's dtype "
                                       "(default: report them as dtype mismatches, not loaded).")] = False,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="Whether missing and unexpected keys fail "
                                         "the check (shape and dtype mismatches always do).")] = True,
    exact: ExactOption = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    json_: JsonOption = False,
    top: TopOption = TOP,
) -> None:
    """Load a checkpoint into a model (and a reference) through load_state_dict, and compare.

    Names, shapes and dtypes are checked before loading (no size-mismatch traceback); the model is
    loaded strictly when clean, else the loadable keys are; the state dict read back must equal
    what was loaded; the two loaded models are diffed (--exact/--atol/--rtol judge them). With
    --map, each model gets the checkpoint as is, through the mapping or through its inverse,
    whichever fits its keys. --json prints schema tensorparity.load-check/1. Exit code: 0 both
    load strictly and agree, 1 missing/unexpected keys, shape or dtype mismatches, or differing
    values, 2 error.
    """
    factory = one_model(model, model_option)
    from tensorparity import load_check

    check_top(top)
    tolerance = parse_tolerance(exact=exact, atol=atol, rtol=rtol)
    report = load_check(checkpoint, model=factory, reference=reference, mapping=map_, tolerance=tolerance,
                        strict=strict, cast=cast, reference_optional=reference_optional)
    finish(report, json_=json_, top=top)
