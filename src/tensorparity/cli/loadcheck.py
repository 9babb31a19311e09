"""``tensorparity load-check CKPT --model pkg.mod:factory [--reference ...] [--map M]``: does a
checkpoint load into the model, and into the reference, with the same values?
Exit 0 passed, 1 a key/shape/dtype/value problem, 2 error."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.checks._loadcheck import load_check
from tensorparity.cli._common import command, finish
from tensorparity.cli.diff import parse_tolerance
from tensorparity.errors import UsageError

__all__ = ["load_check_command"]

_FACTORY = "'pkg.module:function', 'pkg.module:Class' or 'path/to/file.py:function'"


@command
def load_check_command(
    checkpoint: Annotated[str, typer.Argument(help="The checkpoint: any file or folder tensorparity.open reads "
                                                   "(its model weights are loaded).", show_default=False)],
    model: Annotated[str, typer.Option("--model", metavar="FACTORY", show_default=False,
                                       help=f"Builds the local model, called with no arguments: {_FACTORY}. "
                                            "It is imported and run: it is your code.")],
    reference: Annotated[str | None, typer.Option("--reference", "-r", metavar="FACTORY",
                                                  help="Builds the reference model, the same way. A reference that "
                                                       "cannot be imported is an error (see --reference-optional).")
                          ] = None,
    reference_optional: Annotated[bool, typer.Option("--reference-optional", help="If the reference's package is not "
                                                     "installed, check the local side alone (and say so) instead of "
                                                     "failing.")] = False,
    map_: Annotated[str | None, typer.Option("--map", "-m", metavar="MAP.yaml",
                                             help="Mapping between the checkpoint's and the models' key spaces; "
                                                  "each model gets the checkpoint as is, through it or through its "
                                                  "inverse, whichever fits its keys.")] = None,
    cast: Annotated[bool, typer.Option("--cast", help="Load tensors of another dtype cast to the model's dtype "
                                       "(default: report them as dtype mismatches, not loaded).")] = False,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="Whether missing and unexpected keys fail "
                                         "the check (shape and dtype mismatches always do).")] = True,
    exact: Annotated[bool, typer.Option("--exact", help="The two loaded models must agree bitwise.")] = False,
    atol: Annotated[float | None, typer.Option("--atol", metavar="X", help="Absolute tolerance between the two "
                                               "loaded models (default: torch.testing's per dtype).")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", metavar="Y", help="Relative tolerance (default: "
                                               "torch.testing's per dtype).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema "
                                        "tensorparity.load-check/1) and nothing else.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Rows shown per list before folding.")] = 10,
) -> None:
    """Load a checkpoint into a model (and a reference) through load_state_dict, and compare.

    Names, shapes and dtypes are checked before loading (no size-mismatch traceback); the model is
    loaded strictly when clean, else the loadable keys are; the state dict read back must equal
    what was loaded; the two loaded models are diffed. Exit code: 0 both load strictly and agree,
    1 missing/unexpected keys, shape or dtype mismatches, or differing values, 2 error.
    """
    if top < 0:
        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")
    tolerance = parse_tolerance(exact=exact, atol=atol, rtol=rtol)
    report = load_check(checkpoint, model=model, reference=reference, mapping=map_, tolerance=tolerance,
                        strict=strict, cast=cast, reference_optional=reference_optional)
    finish(report, json_=json_, top=top)
