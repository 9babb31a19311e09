"""``tensorparity map``: mappings between the keys of two checkpoints.

``tensorparity map suggest A B -o map.yaml`` suggests one from names and tensor content. Exit
code: 0 every key of both sides has a partner, 1 some keys are unmatched (they are listed),
2 error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tensorparity._output import write_text
from tensorparity.cli._common import check_output, command, emit_json, report_stream, stdout_console
from tensorparity.errors import UsageError
from tensorparity.mapping.suggest import suggest_mapping

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
    a: Annotated[str, typer.Argument(help="Side A: any file or folder tensorparity.open reads.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Side B.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="MAP.yaml",
                                                help="Write the mapping here (atomically). Without it, the YAML "
                                                     "goes to stdout.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace an existing output file "
                                            "(never an input). --force is the old spelling.")] = False,
    weights_only: Annotated[bool | None, typer.Option(
        "--weights-only/--all-keys",
        help="Match model weights only, or every key. Default: as diff does (weights only when one side is a "
             "bare state dict and the other a Lightning/NeMo/training checkpoint).", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the suggestion as JSON (schema tensorparity.suggest/1) "
                                        "and nothing else.")] = False,
    top: Annotated[int, typer.Option("--top", metavar="N", help="Rows shown per list before folding.")] = 20,
) -> None:
    """Suggest a mapping from A's keys to B's: by name, then by tensor content (identical bytes,
    transposed, concatenated, RoPE-permuted, cast, then close statistics), generalised into
    templates over layer indices.

    Exit code: 0 every key has a partner, 1 some keys are unmatched (listed), 2 error.
    """
    if top < 0:
        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")
    if output is not None:
        check_output(output, [a, b], overwrite, what="the mapping")
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
