"""``tensorparity inspect PATH``: what a checkpoint holds, from its metadata alone."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.checkpoint._inspect import inspect
from tensorparity.cli._common import command, emit_json, stdout_console

__all__ = ["inspect_command"]


@command
def inspect_command(
    path: Annotated[str, typer.Argument(help="Checkpoint file or folder (any format tensorparity.open reads).",
                                        show_default=False)],
    keys: Annotated[str | None, typer.Option("--keys", "-k", metavar="REGEX",
                                             help="List only keys matching this regular expression.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Fold nothing: every key and every placeholder.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="How many of the largest tensors to list.")] = 10,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema "
                                        "tensorparity.inspect/1) and nothing else.")] = False,
) -> None:
    """Show what a checkpoint holds, from its metadata alone.

    Format, provenance, sections, dtypes, the largest tensors, the key tree, and every piece of
    code the file asked to run (recorded, never run). No tensor data is loaded.
    """
    report = inspect(path, keys=keys, top=top)
    if json_:
        emit_json(report.to_json())
    else:
        report.render(stdout_console(), fold=not all_)
