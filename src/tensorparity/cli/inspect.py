"""``tensorparity inspect PATH``: what a checkpoint holds, from its metadata alone."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import TOP, JsonOption, KeysOption, TopOption

__all__ = ["inspect_command"]


@command
def inspect_command(
    path: Annotated[str, typer.Argument(metavar="PATH", help="Checkpoint file or folder (any format "
                                        "tensorparity.open reads).", show_default=False)],
    keys: KeysOption = None,
    all_: Annotated[bool, typer.Option("--all", help="Fold nothing: every key and every placeholder.")] = False,
    top: TopOption = TOP,
    json_: JsonOption = False,
) -> None:
    """Show what a checkpoint holds, from its metadata alone.

    Format, provenance, sections, dtypes, the largest tensors (--top of them), the key tree, and
    every piece of code the file asked to run (recorded, never run). No tensor data is loaded.
    --keys lists only the matching keys. --json prints schema tensorparity.inspect/1.
    """
    from tensorparity import inspect

    report = inspect(path, keys=keys, top=top)
    finish(report, json_=json_, top=top, fold=not all_)
