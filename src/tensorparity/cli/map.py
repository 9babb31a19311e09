"""``tensorparity map``: mappings between the keys of two checkpoints.

``tensorparity map suggest A B -o map.yaml`` suggests one from names and tensor content. Exit
code: 0 every key of both sides has a partner, 1 some keys are unmatched (they are listed),
2 error.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tensorparity.cli._common import check_output, command, emit_json, report_stream, stdout_console
from tensorparity.cli._options import (
    TOP,
    ForceOption,
    JsonOption,
    OutputOption,
    OverwriteOption,
    TopOption,
    WeightsOnlyOption,
    check_top,
)

__all__ = ["map_app", "suggest_command"]

map_app = typer.Typer(
    name="map",
    help="Mappings between the keys (and layouts) of two checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@map_app.callback()
def _map() -> None:
    """Mappings between the keys (and layouts) of two checkpoints."""


@command
def suggest_command(
    a: Annotated[str, typer.Argument(metavar="A", help="Side A: any file or folder tensorparity.open reads.",
                                     show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="Side B.", show_default=False)],
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    force: ForceOption = False,
    weights_only: WeightsOnlyOption = None,
    json_: JsonOption = False,
    top: TopOption = TOP,
) -> None:
    """Suggest a mapping from A's keys to B's: by name, then by tensor content (identical bytes,
    transposed, concatenated, RoPE-permuted, cast, then close statistics), generalised into
    templates over layer indices.

    Writes the mapping (YAML) to -o/--output, atomically; without it, the YAML goes to stdout.
    --weights-only/--all-keys decide as diff does. --json prints schema tensorparity.suggest/1.
    Exit code: 0 every key has a partner, 1 some keys are unmatched (listed), 2 error.
    """
    check_top(top)
    overwrite = overwrite or force
    if output is not None:
        check_output(output, [a, b], overwrite, what="the mapping")
    from tensorparity._output import write_text
    from tensorparity.mapping.suggest import suggest_mapping

    suggestion = suggest_mapping(a, b, weights_only=weights_only)
    if output is not None:
        write_text(output, suggestion.to_yaml(), what="the mapping")
    if json_:
        emit_json(suggestion.to_json())
    elif output is not None:
        console = stdout_console()
        suggestion.render(console, top=top)
        console.print(f"wrote {output}", markup=False, highlight=False)
    else:
        report_stream().write(suggestion.to_yaml())
        report_stream().flush()
        sys.stderr.write(suggestion.summary() + ("" if suggestion.complete else
                                                 " (listed at the end of the YAML)") + "\n")
    raise typer.Exit(suggestion.exit_code)


map_app.command("suggest")(suggest_command)
