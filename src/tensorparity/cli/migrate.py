"""``tensorparity migrate CKPT --migrations SPEC``: bring a checkpoint to the current version.

Exit 0: migrated (verified), a dry run, or already up to date; 2: error (nothing written).
"""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import TOP, FormatOption, JsonOption, OutputOption, OverwriteOption, TopOption, check_top

__all__ = ["migrate_command"]


@command
def migrate_command(
    ckpt: Annotated[str, typer.Argument(metavar="CKPT", help="The checkpoint to migrate: any file or folder "
                                        "tensorparity.open reads.", show_default=False)],
    migrations: Annotated[str, typer.Option("--migrations", metavar="pkg.mod|file.py|spec.yaml",
                                            help="The migrations: a Python module or file defining MIGRATIONS "
                                                 "(or pkg.mod:NAME), or a YAML spec.", show_default=False)],
    output: OutputOption = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace CKPT atomically (temporary file beside it, "
                                           "fsync, rename).")] = False,
    backup: Annotated[bool, typer.Option("--backup", help="With --in-place: keep the original as CKPT.bak.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and every change it would make; write "
                                          "nothing.")] = False,
    to: Annotated[str | None, typer.Option("--to", metavar="VERSION", help="The version to reach (default: the "
                                           "newest the migrations know; older: a downgrade through inverses).")] = None,
    from_: Annotated[str | None, typer.Option("--from", metavar="VERSION", help="The checkpoint's version, when it "
                                              "records none.")] = None,
    format_: FormatOption = None,
    overwrite: OverwriteOption = False,
    json_: JsonOption = False,
    top: TopOption = TOP,
) -> None:
    """Migrate a checkpoint through versioned migrations: recorded inside the output, verified, atomic.

    Reads the checkpoint's version, applies every migration newer than it in order, writes the
    result under a temporary name, re-opens it and checks every untouched tensor bitwise against
    the source, and only then renames it into place. A second run finds nothing to do. The
    output goes to -o/--output (default: <stem>_fixed<ext> beside CKPT), in --format (default:
    the output's suffix, else CKPT's own). --json prints schema tensorparity.migrate/1.
    """
    check_top(top)
    if dry_run and (in_place or output is not None):
        from tensorparity.errors import UsageError

        raise UsageError("--dry-run writes nothing, so --in-place/-o would be ignored", fix="drop one of them")
    from tensorparity.migrate._migrate import migrate

    report = migrate(ckpt, migrations, output=None if output is None else str(output), in_place=in_place,
                     backup=backup, dry_run=dry_run, target=to, from_version=from_, format=format_,
                     overwrite=overwrite)
    finish(report, json_=json_, top=top)
