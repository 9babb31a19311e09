"""``tensorparity convert SRC DST``: rewrite a checkpoint in another format, streamed, atomic, verified."""

from __future__ import annotations

from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import (
    FormatOption,
    JsonOption,
    MapOption,
    NoVerifyOption,
    OverwriteOption,
    WeightsOnlyOption,
)

__all__ = ["convert_command"]


@command
def convert_command(
    src: Annotated[str, typer.Argument(metavar="SRC", help="The checkpoint to convert: any file or folder "
                                       "tensorparity.open reads.", show_default=False)],
    dst: Annotated[str, typer.Argument(metavar="DST", help="Where to write: a file (.pt .ckpt .safetensors .nemo) "
                                       "or a folder (dcp, safetensors-sharded).", show_default=False)],
    format_: FormatOption = None,
    max_shard_size: Annotated[str | None, typer.Option(
        "--max-shard-size", metavar="SIZE", help="Bytes per shard for safetensors-sharded, e.g. 500MB, 2GB, 1GiB.",
        show_default=False)] = None,
    weights_only: WeightsOnlyOption = None,
    map_: MapOption = None,
    inverse: Annotated[bool, typer.Option(
        "--inverse", help="Apply the --map from its second side to its first (b_to_a).")] = False,
    overwrite: OverwriteOption = False,
    no_verify: NoVerifyOption = False,
    json_: JsonOption = False,
) -> None:
    """Convert a checkpoint between torch zip, safetensors (single or sharded), DCP and .nemo.

    Tensors are streamed one at a time (memory ~ the largest tensor); DST is written under a
    temporary name beside it, read back and compared bitwise with SRC, then renamed into place.
    A crash or a full disk leaves DST as it was. The format comes from DST's suffix unless
    --format names it (a suffix-less DST with --max-shard-size is safetensors-sharded).
    --weights-only writes the model weights alone (e.g. a Lightning checkpoint's state_dict,
    keyed as the model names them); the default is every key. With --map, the keys are renamed
    and the tensors transformed into the other implementation's layout on the way (--inverse for
    the mapping's other direction), and DST is verified against the mapped SRC. SRC is never
    replaced.
    --json prints schema tensorparity.convert/1. Exit code: 0 written and verified, 2 error.
    """
    from tensorparity import convert

    report = convert(src, dst, format=format_, max_shard_size=max_shard_size, overwrite=overwrite,
                     verify=not no_verify, weights_only=bool(weights_only), mapping=map_,
                     direction="b_to_a" if inverse else "a_to_b")
    finish(report, json_=json_)
