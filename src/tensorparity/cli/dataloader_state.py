"""``tensorparity dataloader-state``: legacy data-loader state -> torchdata ``StatefulDataLoader`` state.

``convert LEGACY_DIR OUT`` writes the state a resumed ``StatefulDataLoader`` loads to yield
exactly the batches the interrupted run would have yielded next; ``inspect PATH`` describes a
legacy folder or a saved state. Exit code: 0 done, 2 error (one line on stderr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tensorparity.cli._common import command, finish
from tensorparity.cli._options import ForceOption, JsonOption, NoVerifyOption, OverwriteOption

__all__ = ["convert_command", "dataloader_state_app", "inspect_command"]

dataloader_state_app = typer.Typer(
    name="dataloader-state",
    help="Convert and inspect data-loader state (legacy layout -> torchdata StatefulDataLoader).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataloader_state_app.callback()
def _dataloader_state() -> None:
    """Convert and inspect data-loader state (legacy layout -> torchdata StatefulDataLoader)."""


@command
def convert_command(
    legacy_dir: Annotated[Path, typer.Argument(metavar="LEGACY_DIR", show_default=False,
                                               help="Folder of loader_state.json + worker_<i>.json (or .pt).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", show_default=False,
                                        help="Where to write the StatefulDataLoader state (torch.save, atomic).")],
    num_workers: Annotated[int | None, typer.Option(
        "--num-workers", "-w", metavar="W", show_default=False,
        help="Workers of the new loader (default: the legacy count). Map-style datasets may change it; "
             "iterable ones may not.")] = None,
    sampler: Annotated[str | None, typer.Option(
        "--sampler", metavar="random|distributed|sequential", show_default=False,
        help="Map-style: the new loader's sampler. random = shuffle=True (default for a shuffled run); "
             "distributed = StatefulDistributedSampler (repeats the old seed+epoch order in later epochs too).")
    ] = None,
    overwrite: OverwriteOption = False,
    force: ForceOption = False,
    no_verify: NoVerifyOption = False,
    json_: JsonOption = False,
) -> None:
    """Convert a legacy data-loader state folder into a torchdata StatefulDataLoader state.

    The state is proven before it is written: a real StatefulDataLoader restored from it must
    yield the legacy run's next batches (map-style) or restart every worker at its own
    position (iterable). OUT is written atomically with torch.save; a legacy file is never
    replaced. --json prints schema tensorparity.dataloader_state_conversion/1.
    """
    from tensorparity import convert_dataloader_state

    conversion = convert_dataloader_state(legacy_dir, out, num_workers=num_workers, sampler=sampler,
                                          verify=not no_verify, force=overwrite or force)
    finish(conversion, json_=json_)


@command
def inspect_command(
    path: Annotated[Path, typer.Argument(metavar="PATH", show_default=False,
                                         help="A legacy loader-state folder, or a saved StatefulDataLoader state.")],
    json_: JsonOption = False,
) -> None:
    """Describe a data-loader state: epoch, batches and samples read, sampler, each worker's position.

    --json prints schema tensorparity.dataloader_state/1.
    """
    from tensorparity.dataloader._state import inspect_dataloader_state

    summary = inspect_dataloader_state(path)
    finish(summary, json_=json_)


dataloader_state_app.command("convert")(convert_command)
dataloader_state_app.command("inspect")(inspect_command)
