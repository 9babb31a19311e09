"""``tensorparity capture MODEL -o TRACE``: run a model on a reproducible input, forward and
backward, and write every layer's tensors as a trace folder. Exit 0 written, 2 error.

The work itself is :func:`tensorparity.trace._capture_run.capture_run`, imported when the command
runs (it needs torch), so that the CLI starts without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tensorparity.cli._common import command
from tensorparity.cli._options import (
    CheckpointOption,
    ExcludeOption,
    IncludeOption,
    ModelArgument,
    NoiseFloorOption,
    OutOption,
    OutputOption,
    OverwriteOption,
    SeedOption,
    one_output,
)

__all__ = ["capture_command"]


@command
def capture_command(
    model: ModelArgument,
    output: OutputOption = None,
    out: OutOption = None,
    input_spec: Annotated[list[str] | None, typer.Option(
        "--input-spec", metavar="SPEC", help="The input, built from its shape, dtype and the seed: "
        "[NAME=]SHAPE[:DTYPE][:lengths[=NAME]][:high=N][:seed=N], e.g. 2x16x20:float32 or 2x16000:float32:lengths "
        "(a padded batch plus its lengths). Repeat for more arguments; NAME= passes a keyword argument "
        "(input_signal=2x16000:float32:lengths gives input_signal and input_signal_length).")] = None,
    input_fn: Annotated[str | None, typer.Option(
        "--input", metavar="FUNCTION", help="A function returning the input: a tensor, a tuple (positional "
        "arguments) or a dict (keyword arguments).")] = None,
    checkpoint: CheckpointOption = None,
    mode: Annotated[str, typer.Option("--mode", help="full: store every tensor; stats: statistics only; "
                                                     "window: tensors only for --window.")] = "full",
    window: Annotated[str | None, typer.Option("--window", metavar="REGEX",
                                               help="Module paths whose tensors are stored in window mode.")] = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    types: Annotated[list[str] | None, typer.Option("--type", metavar="CLASS",
                                                    help="Record only modules of this class.")] = None,
    inputs: Annotated[bool, typer.Option("--inputs", help="Also record every module's inputs and their "
                                                          "gradients.")] = False,
    seed: SeedOption = 0,
    no_backward: Annotated[bool, typer.Option("--no-backward", help="Forward only.")] = False,
    loss: Annotated[str | None, typer.Option("--loss", metavar="FUNCTION",
                                             help="loss(output) -> scalar for the backward pass "
                                                  "(default: output.float().sum()).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Run on this device (cpu, cuda, cuda:1).")] = None,
    train: Annotated[bool, typer.Option("--train", help="Run in training mode (default: model.eval(), so "
                                                        "that dropout is off).")] = False,
    noise_floor: NoiseFloorOption = False,
    overwrite: OverwriteOption = False,
    params: Annotated[bool, typer.Option("--params/--no-params", help="Record every parameter as the forward "
                                         "began (stored in full mode), so that 'tensorparity map suggest' and "
                                         "diff can read the weights from the trace.")] = True,
    dtensor: Annotated[str, typer.Option("--dtensor", help="DTensors (FSDP2, tensor parallel): 'local' records "
                                         "each rank's shard with its placement (assembled when the trace is read), "
                                         "'gather' the full tensor.")] = "local",
    local_grads: Annotated[bool, typer.Option("--local-grads", help="Also record each rank's parameter gradients "
                                              "before DDP's all-reduce (kind param_grad_local).")] = False,
) -> None:
    """Capture every layer's forward and backward tensors of a model into a trace folder.

    The trace (safetensors shards plus manifest.json) holds the input itself, its hash and the
    provenance, so that another environment can replay and compare it. -o/--output (required)
    is the trace's folder: a new one, or a trace to replace with --overwrite (never another kind
    of folder). --include/--exclude match module paths. --noise-floor also runs the model in
    float64 on the same input and stores each record's measured float32 noise, for 'tensorparity
    compare --noise-floor'. Exit 0 written, 2 error.
    """
    trace_dir = one_output(output, out, required=True)
    from tensorparity.checkpoint.tracefolder.format import MODES
    from tensorparity.errors import UsageError
    from tensorparity.trace._capture_run import capture_run

    if mode not in MODES:
        raise UsageError(f"--mode {mode!r} is not one of {', '.join(MODES)}", fix="pass --mode full, stats or window")
    if (mode == "window") != (window is not None):
        raise UsageError("--mode window and --window REGEX go together",
                         fix=r"pass e.g. --mode window --window '^layers\.3\.' (tensors stored for those modules only)")
    trace = capture_run(model, trace_dir, input_spec=input_spec, input_fn=input_fn, checkpoint=checkpoint, mode=mode,
                        window=window, include=include, exclude=exclude, types=types, inputs=inputs, seed=seed,
                        backward=not no_backward, loss=loss, device=device, train=train, noise_floor=noise_floor,
                        params=params, overwrite=overwrite, dtensor=dtensor, local_grads=local_grads)
    render_capture(trace, trace_dir)
    raise typer.Exit(0)


def render_capture(trace: Any, out: Path) -> None:
    """What the command prints once the trace is written."""
    from tensorparity.cli._common import stdout_console
    from tensorparity.report._render import human_bytes, plural

    console = stdout_console()
    prov = trace.provenance
    shards = sorted(trace.path.glob("shard-*.safetensors")) if trace.path is not None else []
    backward = any(r.kind in ("grad_output", "param_grad") for r in trace.records)
    n_params = sum(r.kind == "param" for r in trace.records)
    params = f" and {plural(n_params, 'parameter')}" if n_params else ""
    console.print(f"captured {plural(len(trace.records), 'record')} of {plural(len(trace.layers()), 'layer')}{params} "
                  f"({prov['model_class'].rsplit('.', 1)[-1]}, mode {trace.mode}, "
                  f"{'forward + backward' if backward else 'forward only'}) -> {out}", soft_wrap=True)
    stats_only = sum(r.is_tensor and not r.stored for r in trace.records)
    console.print(f"  stored: {plural(sum(r.stored for r in trace.records), 'tensor')}, "
                  f"{human_bytes(sum(p.stat().st_size for p in shards))} in {plural(len(shards), 'shard')}; "
                  f"statistics only: {stats_only:,}")
    what = ", ".join(prov.get("input_spec") or []) or prov.get("input_function") or "?"
    console.print(f"  input: {what} (hash {prov.get('input_hash')})")
    extra = f", checkpoint hash {prov['checkpoint_hash']}" if prov.get("checkpoint_hash") else ""
    console.print(f"  seed {prov.get('seed')}, torch {prov.get('torch')}, {prov.get('device')}{extra}")
