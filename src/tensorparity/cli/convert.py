"""``tensorparity convert SRC DST``: rewrite a checkpoint in another format, streamed, atomic, verified."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, emit_json, stdout_console

__all__ = ["convert_command"]


@command
def convert_command(
    src: Annotated[str, typer.Argument(help="The checkpoint to convert: any file or folder tensorparity.open reads.",
                                       show_default=False)],
    dst: Annotated[str, typer.Argument(help="Where to write: a file (.pt .ckpt .safetensors .nemo) or a folder "
                                            "(dcp, safetensors-sharded).", show_default=False)],
    format_: Annotated[str | None, typer.Option(
        "--format", "-f", metavar="torch|safetensors|safetensors-sharded|dcp|nemo",
        help="Output format (default: from DST's suffix; a suffix-less DST with --max-shard-size is "
             "safetensors-sharded).", show_default=False)] = None,
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", metavar="SIZE", help="Bytes per shard for safetensors-sharded, e.g. 500MB, 2GB, 1GiB.",
        show_default=False)] = None,
    weights_only: Annotated[bool, typer.Option(
        "--weights-only", help="Write the model weights alone (e.g. a Lightning checkpoint's state_dict, keyed as "
                               "the model names them).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists (never SRC).")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip reading DST back and comparing it bitwise "
                                            "with SRC before it is put in place.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema tensorparity.convert/1) "
                                        "and nothing else.")] = False,
) -> None:
    """Convert a checkpoint between torch zip, safetensors (single or sharded), DCP and .nemo.

    Tensors are streamed one at a time (memory ~ the largest tensor); DST is written under a
    temporary name beside it, read back and compared bitwise with SRC, then renamed into place.
    A crash or a full disk leaves DST as it was. Exit code: 0 written and verified, 2 error.
    """
    from tensorparity.migrate._convert import convert

    report = convert(src, dst, format=format_, max_shard_size=max_shard_size, overwrite=overwrite,
                     verify=not no_verify, weights_only=weights_only)
    if json_:
        emit_json(report.to_json())
    else:
        report.render(stdout_console())
