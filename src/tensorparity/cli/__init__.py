"""The ``tensorparity`` command line: a thin typer app over the library.

Exit codes: 0 ok, 1 the things compared differ (diff and parity commands), 2 error.

Importing it imports no library module and no torch: the commands import what they need when
they run, so that ``tensorparity --help`` (and a usage error) answers at once. The words every
command shares are declared once, in :mod:`tensorparity.cli._options`.

Example:
    $ tensorparity inspect model.ckpt --keys 'layers\\.0\\.' --top 5
    $ tensorparity diff reference.pt port.safetensors --map reference_to_port.yaml
"""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli.capture import capture_command
from tensorparity.cli.compare import compare_command
from tensorparity.cli.convert import convert_command
from tensorparity.cli.dataloader_state import dataloader_state_app
from tensorparity.cli.diff import diff_command
from tensorparity.cli.inspect import inspect_command
from tensorparity.cli.loadcheck import load_check_command
from tensorparity.cli.map import map_app
from tensorparity.cli.migrate import migrate_command
from tensorparity.cli.replay import replay_command
from tensorparity.cli.resume import resume_check_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="tensorparity",
    help="Prove that two PyTorch checkpoints, implementations or runs are numerically the same.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from tensorparity import __version__

        typer.echo(f"tensorparity {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Prove that two PyTorch checkpoints, implementations or runs are numerically the same."""


app.command("inspect")(inspect_command)
app.command("diff")(diff_command)
app.command("capture")(capture_command)
app.command("compare")(compare_command)
app.command("replay")(replay_command)
app.command("resume-check")(resume_check_command)
app.command("load-check")(load_check_command)
app.command("convert")(convert_command)
app.command("migrate")(migrate_command)
app.add_typer(map_app, name="map")
app.add_typer(dataloader_state_app, name="dataloader-state")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tensorparity`` console script and of ``python -m tensorparity``.

    Exit codes: 0 same (or written), 1 differs, 2 error (usage errors included), 130 interrupted
    (Ctrl-C: one line, ``interrupted``, no traceback). With ``--json`` an error is also one JSON
    document on stdout (schema ``tensorparity.error/1``), click's usage errors included.
    """
    import signal
    import sys

    from tensorparity.cli._common import EXIT_INTERRUPTED, fail_json

    def on_interrupt(signum: int, frame: object) -> None:
        # Only a command that has started writing can have a writer to tell (and it has imported
        # _output by then); importing it here would load the library for every --help.
        output = sys.modules.get("tensorparity._output")
        if output is not None:
            output.note_interrupt()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, prog_name="tensorparity", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        code = int(getattr(exc, "exit_code", 2))
        if "--json" in args:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            fail_json(message, "see tensorparity COMMAND --help", code)
        sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
