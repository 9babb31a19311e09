"""Capture every layer of a model, forward and backward: ``with capture(model) as trace: ...``.

Hooks record, per module call: its forward output (and, with ``inputs=True``, its inputs), the
gradient w.r.t. that output (a ``Tensor.register_hook`` placed on the output in the forward hook:
it sees the gradient of the value the module returned even if a later in-place op changes the
tensor), with ``inputs=True`` the gradient w.r.t. each input tensor (the gradient the tensor
receives from all its consumers), every parameter's gradient once accumulated, and the model's
own input (always stored in full, so another environment can replay it) and output. With
``params=True`` (the default) every parameter is recorded once, as the model's first forward is
about to use it (kind ``param``: ``module`` its owner, ``path`` its name, call 0), so that two
traces also say which weights each implementation ran with and ``map suggest`` can pair them.

Execution index: records are numbered in the order they are captured: forward records in
forward order (a module's output when its forward returns, children before their parent), then
backward records as the gradients arrive; parameters (read as the first forward began) are
numbered after all of them.
A module called twice has calls 0 and 1.

Call sites: a call is recorded under the name of the place it was called from, so that one
module instance shared by several parents (NeMo's Conformer shares one activation among all
its feed-forward blocks: ``layers.1.ff1.activation is layers.0.ff1.activation``) is recorded
once per parent, not as calls #0..#3 of its first name. The innermost module running when the
call begins (the *caller*, recorded under name ``C``) decides:

- the caller holds the module in its tree at relative path ``r`` (a direct attribute, or deeper
  through containers): the call is ``C.r``; for the module's registered parent, recorded under
  its own name, that is the module's registered name, unchanged;
- the caller does not hold it (a module called from outside its tree): ``C.<last part of its
  registered name>``, unless that is the path of a real module, then its registered name;
- no module is running (the model itself, or a sub-module called outside the model): its
  registered name.

Call numbers count per recorded name (``layers.1.ff1.activation`` call 0). Every recorded name
that is not a registered one is listed in the provenance, ``call_sites``: ``{recorded:
registered}`` (:meth:`Trace.module_path` reads it). Parameter gradients and parameters keep
their owner's registered name: one parameter, one record. A forward that raises still ends its
call (``always_call`` hooks), and the block's exit forgets every running call.

Capture never changes what the model computes: hooks return nothing, tensors are copied
(``clone``) before anything else touches them, and every hook is removed when the block exits,
also when it raises.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tensorparity.checkpoint.tracefolder._dtensor import DTENSOR_MODES
from tensorparity.checkpoint.tracefolder.format import MODES, TraceError, build_manifest, write_manifest
from tensorparity.checkpoint.tracefolder.reader import ShardSet, Trace, prepare_folder
from tensorparity.checkpoint.tracefolder.writer import TraceWriter
from tensorparity.errors import UsageError
from tensorparity.trace._recorder import Recorder, type_name

__all__ = ["capture"]

Window = str | range | tuple[int, int] | None


@dataclasses.dataclass
class Options:
    """What one capture records (checked by :func:`_options`)."""

    include: list[re.Pattern[str]]
    exclude: list[re.Pattern[str]]
    types: list[type | str]
    mode: str
    window_re: re.Pattern[str] | None
    window_range: range | None
    inputs: bool
    grads: bool
    param_grads: bool
    params: bool = True
    dtensor: str = "local"
    local_grads: bool = False

    def selected(self, name: str, module: nn.Module) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        if any(p.search(name) for p in self.exclude):
            return False
        if self.types:
            cls = type(module)
            return any(isinstance(module, t) if isinstance(t, type) else t in (cls.__name__, type_name(module))
                       for t in self.types)
        return True

    def full(self, name: str, ordinal: int) -> bool:
        if self.mode != "window":
            return self.mode == "full"
        if not name:  # the model's own output: the end a comparison starts from
            return True
        if self.window_re is not None:
            return bool(self.window_re.search(name))
        return self.window_range is not None and ordinal in self.window_range


def _patterns(value: str | Sequence[str] | None, what: str, problems: list[str]) -> list[re.Pattern[str]]:
    texts = [value] if isinstance(value, str) else list(value or [])
    out = []
    for text in texts:
        try:
            out.append(re.compile(text))
        except (re.error, TypeError) as exc:
            problems.append(f"{what} {text!r} is not a regular expression ({exc})")
    return out


def _options(include: Any, exclude: Any, types: Any, mode: Any, window: Any, inputs: bool, grads: bool,
             param_grads: bool, params: bool, dtensor: Any = "local", local_grads: bool = False) -> Options:
    problems: list[str] = []  # every problem at once, before any hook is placed
    inc = _patterns(include, "include", problems)
    exc = _patterns(exclude, "exclude", problems)
    type_list = [types] if isinstance(types, (str, type)) else list(types or [])
    for t in type_list:
        if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
            problems.append(f"types entry {t!r} is neither a class name nor an nn.Module class")
    if mode not in MODES:
        problems.append(f"mode {mode!r} is not one of {', '.join(MODES)}")
    window_re, window_range = None, None
    if mode == "window":
        if isinstance(window, str):
            window_re = (_patterns(window, "window", problems) or [None])[0]
        elif isinstance(window, range):
            window_range = window
        elif isinstance(window, tuple) and len(window) == 2 and all(isinstance(i, int) for i in window):
            window_range = range(*window)
        else:
            problems.append(f"mode 'window' needs window= a regular expression or an index range, not {window!r}")
    elif window is not None:
        problems.append("window= is only used with mode='window'")
    if dtensor not in DTENSOR_MODES:
        problems.append(f"dtensor {dtensor!r} is not one of {', '.join(DTENSOR_MODES)}")
    if local_grads and not param_grads:
        problems.append("local_grads=True records parameter gradients, which param_grads=False leaves out")
    if problems:
        fix = ("e.g. capture(model, include=r'layers\\.', mode='window', window=r'layers\\.1\\.')"
               if not all(p.startswith(("dtensor", "local_grads")) for p in problems)
               else "pass dtensor='local' or 'gather' (--dtensor local|gather); local_grads with param_grads")
        raise UsageError("; ".join(problems), fix=fix)
    return Options(inc, exc, type_list, mode, window_re, window_range, inputs, grads, param_grads, params,
                   dtensor, local_grads)


def _rank_world(rank: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() if rank is None else rank, dist.get_world_size()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        env_rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        world, env_rank = 1, 0
    return (env_rank if rank is None else rank), world


def _agree(ok: bool, rank: int, folder: Path | None) -> None:
    """Under ``torch.distributed``: every rank says whether its capture succeeded; where one
    failed, every rank fails and none writes its manifest (a trace of some ranks only would look
    complete). Raises on the ranks that succeeded; a rank that failed raises its own error."""
    import torch
    import torch.distributed as dist

    if folder is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    device = "cpu"
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    failed[dist.get_rank()] = 0 if ok else 1
    dist.all_reduce(failed)
    bad = [r for r, f in enumerate(failed.tolist()) if f]
    if ok and bad:
        raise TraceError(f"the capture failed on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}, so "
                         f"rank {rank} wrote no manifest either", path=folder,
                         fix="see that rank's error above, fix it and capture again")


@contextmanager
def capture(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: str | type | Collection[str | type] | None = None,
    mode: str = "full",
    window: Window = None,
    inputs: bool = False,
    grads: bool = True,
    param_grads: bool = True,
    params: bool = True,
    dtensor: str = "local",
    local_grads: bool = False,
    out: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    provenance: Mapping[str, Any] | None = None,
    queue_bytes: int = 512 << 20,
    shard_bytes: int = 256 << 20,
) -> Iterator[Trace]:
    """Record every module's forward and backward tensors while the block runs.

    Args:
        model: the model; run it (and its backward) inside the block.
        include: regular expression(s) a module path must match (``re.search``) to be recorded.
        exclude: regular expression(s) of module paths not to record.
        types: record only modules of these classes (classes, or class names, plain or qualified).
        mode: ``full`` (tensors stored), ``stats`` (statistics only, computed on the tensor's
            device; the content hash only where that needs no copy to the CPU), or ``window``
            (tensors stored only for modules in ``window``, statistics for the others).
        window: for ``mode="window"``: a regular expression of module paths, or a range of
            module-call positions in the order calls begin (the model itself is 0).
        inputs: also record each module's inputs (and, with ``grads``, the gradients w.r.t. them).
        grads: record gradients w.r.t. module outputs (and inputs).
        param_grads: record every parameter's gradient once accumulated (``module`` is the
            parameter's owner, ``path`` its name).
        params: record every parameter (of the modules that pass the filters, each shared
            parameter once) as the model's first forward is about to use it: kind ``param``,
            ``module`` its owner, ``path`` its name; stored as the other records are (``full``;
            ``window``: where its owner is in the window), statistics otherwise.
        dtensor: how DTensors (FSDP2 parameters and gradients, tensor-parallel activations) are
            recorded: ``"local"`` (default) this rank's local shard, with its placement (mesh,
            ``Shard(dim)``/``Replicate()``, the global shape and the shard's offset) in the
            record, so that reading the trace assembles the full tensor from every rank's
            shard; ``"gather"`` the full tensor (``full_tensor()``, a collective: every rank
            must run the same capture), the placement kept too.
        local_grads: also record each parameter's gradient as this rank's backward accumulated
            it, before DDP's all-reduce (kind ``param_grad_local``; ``param_grad`` is always the
            gradient the optimizer steps on, read once backward has finished). Not for DTensor
            parameters: FSDP2 has reduce-scattered them before they reach the parameter.
        out: a new (or empty) folder: tensors stream there and the trace is written in the
            trace format; ``None`` keeps them in memory (detached clones, on their device). Under
            ``torchrun`` (``WORLD_SIZE`` > 1) each rank writes ``out/rank-<r>/``.
        rank: this process's rank (default: from ``torch.distributed`` or ``RANK``).
        provenance: extra provenance entries (checkpoint hash, factory, ...).
        queue_bytes: the most bytes waiting for the writer before the model waits for it.
        shard_bytes: shard size.

    Yields:
        The :class:`Trace`; complete once the block has exited. If the block raises, the hooks
        are removed, the error propagates, and a folder being written gets no manifest (opening
        it says the capture did not finish).

    Example:
        >>> import torch, tensorparity.trace as tt
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> with tt.capture(model, mode="stats") as trace:
        ...     model(torch.ones(2, 3)).sum().backward()
        >>> [(r.layer, r.kind) for r in trace.records if r.kind not in ("param", "param_grad")][:3]
        [('<model>', 'model_input'), ('0', 'output'), ('1', 'output')]
        >>> [(r.key, r.stats.numel) for r in trace.select(kind="param")]
        [('0/0/param/weight', 12), ('0/0/param/bias', 4)]
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"capture needs an nn.Module, not {type(model).__name__}", fix="pass the model itself")
    opts = _options(include, exclude, types, mode, window, inputs, grads, param_grads, params, dtensor, local_grads)
    rank, world = _rank_world(rank)
    folder: Path | None = None
    if out is not None:
        folder = Path(out)
        if world > 1:
            folder.mkdir(parents=True, exist_ok=True)
            folder = folder / f"rank-{rank}"
        folder = prepare_folder(folder)
    writer = TraceWriter(folder, shard_bytes=shard_bytes, queue_bytes=queue_bytes) if folder is not None else None
    recorder = Recorder(model, opts, writer)
    trace = Trace(mode=mode)
    try:
        recorder.attach()
        if writer is not None:
            writer.header_room = recorder.header_estimate()
        yield trace
    except BaseException:
        recorder.detach()
        if writer is not None:
            writer.abort()
        _agree(False, rank, folder)  # the other ranks write no manifest either
        raise
    try:
        recorder.detach()
        shards = writer.close() if writer is not None else []
        records = recorder.records()
        prov = recorder.provenance(provenance, rank, world)
    except BaseException:
        if writer is not None:
            writer.abort()
        _agree(False, rank, folder)
        raise
    _agree(True, rank, folder)
    if writer is None or folder is None:
        trace._bind(None, records, prov, None, recorder.tensors)
        return
    write_manifest(folder, build_manifest(records, prov, mode, shards, writer.shard_of, writer.aliases))
    trace._bind(folder, records, prov, ShardSet(folder, shards, writer.shard_of, records, verified=True,
                                                same_as=writer.aliases), {})
