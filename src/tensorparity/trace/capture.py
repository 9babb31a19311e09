"""Capture every layer of a model, forward and backward: ``with capture(model) as trace: ...``.

Hooks record, per module call: its forward output (and, with ``inputs=True``, its inputs), the
gradient w.r.t. that output (a ``Tensor.register_hook`` placed on the output in the forward hook:
it sees the gradient of the value the module returned even if a later in-place op changes the
tensor), with ``inputs=True`` the gradient w.r.t. each input tensor (the gradient the tensor
receives from all its consumers), every parameter's gradient once accumulated, and the model's
own input (always stored in full, so another environment can replay it) and output.

Execution index: records are numbered in the order they are captured: forward records in
forward order (a module's output when its forward returns, children before their parent), then
backward records as the gradients arrive. A module called twice has calls 0 and 1.

Capture never changes what the model computes: hooks return nothing, tensors are copied
(``clone``) before anything else touches them, and every hook is removed when the block exits,
also when it raises.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorparity.errors import UsageError
from tensorparity.trace.format import MODES, STORABLE, TraceWriter, build_manifest, write_manifest
from tensorparity.trace.records import (SCHEMA, TensorStats, TraceRecord, flatten_value, json_value, record_key,
                                       tensor_stats)
from tensorparity.trace.seed import environment, input_hash
from tensorparity.trace.trace import ShardSet, Trace, prepare_folder

__all__ = ["capture"]

Window = str | range | tuple[int, int] | None


def _call_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    # Positional arguments are "0", "1", ...; keyword arguments their names (never digits).
    return (flatten_value(list(args)) if args else []) + (flatten_value(kwargs) if kwargs else [])


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _patterns(value: str | Sequence[str] | None, what: str, problems: list[str]) -> list[re.Pattern[str]]:
    texts = [value] if isinstance(value, str) else list(value or [])
    out = []
    for text in texts:
        try:
            out.append(re.compile(text))
        except (re.error, TypeError) as exc:
            problems.append(f"{what} {text!r} is not a regular expression ({exc})")
    return out


@dataclasses.dataclass
class _Options:
    include: list[re.Pattern[str]]
    exclude: list[re.Pattern[str]]
    types: list[type | str]
    mode: str
    window_re: re.Pattern[str] | None
    window_range: range | None
    inputs: bool
    grads: bool
    param_grads: bool

    def selected(self, name: str, module: nn.Module) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        if any(p.search(name) for p in self.exclude):
            return False
        if self.types:
            cls = type(module)
            return any(isinstance(module, t) if isinstance(t, type) else t in (cls.__name__, _type_name(module))
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


def _options(include: Any, exclude: Any, types: Any, mode: Any, window: Any, inputs: bool, grads: bool,
             param_grads: bool) -> _Options:
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
    if problems:
        raise UsageError("; ".join(problems), fix="e.g. capture(model, include=r'layers\\.', mode='window', "
                                                  "window=r'layers\\.1\\.')")
    return _Options(inc, exc, type_list, mode, window_re, window_range, inputs, grads, param_grads)


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


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards during backward; those calls are not new records.
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _Recorder:
    """The hooks of one capture and what they have recorded so far."""

    def __init__(self, model: nn.Module, opts: _Options, writer: TraceWriter | None) -> None:
        self.model, self.o, self.writer = model, opts, writer
        self.lock = threading.Lock()
        self.indices = itertools.count()  # next() is atomic: hooks of several threads number records
        # Records as tuples, made TraceRecords once the block exits: inside a step a frozen
        # dataclass costs ~8 µs to build (cold caches), a tuple a fraction of it.
        self.finished: list[tuple[Any, ...]] = []
        self.names: dict[Any, str] = {}  # str() of dtypes and devices, by value
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: dict[str, list[int]] = defaultdict(list)
        self.ordinal = 0
        self.full_calls: set[tuple[str, int]] = set()
        self.full_modules: set[str] = set()
        self.param_calls: dict[str, int] = defaultdict(int)
        self.input_hashes: list[str] = []
        self.measured: dict[int, tuple[Any, int, TensorStats]] = {}
        self.handles: list[Any] = []
        self.active = True

    # Hooks
    def attach(self) -> None:
        for name, module in self.model.named_modules():
            selected = name == "" or self.o.selected(name, module)
            kw = {"name": name, "mtype": _type_name(module), "selected": selected}
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._pre, **kw), with_kwargs=True))
            self.handles.append(module.register_forward_hook(functools.partial(self._post, **kw), with_kwargs=True))
        if not self.o.param_grads:
            return
        owners = dict(self.model.named_modules())
        for pname, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            owner, _, local = pname.rpartition(".")
            module = owners[owner]
            if owner and not self.o.selected(owner, module):
                continue
            hook = functools.partial(self._param_grad, owner, _type_name(module), local)
            if hasattr(param, "register_post_accumulate_grad_hook"):
                self.handles.append(param.register_post_accumulate_grad_hook(hook))
            else:  # torch < 2.1: the gradient as it arrives, before accumulation
                self.handles.append(param.register_hook(lambda g, hook=hook, p=param: hook(p, g)))

    def detach(self) -> None:
        self.active = False
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, name: str, mtype: str,
             selected: bool) -> None:
        if not self.active or _in_backward():
            return
        with self.lock:
            call = self.calls[name]
            self.calls[name] += 1
            ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        self.stack[name].append(call)
        full = self.o.full(name, ordinal)
        if full:
            self.full_calls.add((name, call))
            self.full_modules.add(name)
        if name == "":
            self.input_hashes.append(input_hash(*args, **kwargs))
            for path, leaf in _call_leaves(args, kwargs):
                self.add(name, call, mtype, "model_input", path, leaf, full=True)
        elif selected and self.o.inputs:
            for path, leaf in _call_leaves(args, kwargs):
                self.add(name, call, mtype, "input", path, leaf, full=full)
                if self.o.grads:
                    self._grad_hook(leaf, name, call, mtype, "grad_input", path, full)

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, name: str,
              mtype: str, selected: bool) -> None:
        if not self.active or _in_backward():
            return
        stack = self.stack[name]
        call = stack.pop() if stack else self.calls[name] - 1
        if not selected:
            return
        full = (name, call) in self.full_calls
        kind = "model_output" if name == "" else "output"
        for path, leaf in flatten_value(output):
            self.add(name, call, mtype, kind, path, leaf, full=full)
            if self.o.grads:
                self._grad_hook(leaf, name, call, mtype, "grad_output", path, full)

    def _grad_hook(self, leaf: Any, name: str, call: int, mtype: str, kind: str, path: str, full: bool) -> None:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            hook = functools.partial(self._on_grad, name, call, mtype, kind, path, full)
            self.handles.append(leaf.register_hook(hook))

    def _on_grad(self, name: str, call: int, mtype: str, kind: str, path: str, full: bool,
                 grad: torch.Tensor) -> None:
        if self.active and grad is not None:
            self.add(name, call, mtype, kind, path, grad, full=full)

    def _param_grad(self, owner: str, mtype: str, local: str, param: torch.Tensor,
                    grad: torch.Tensor | None = None) -> None:
        if not self.active:
            return
        grad = param.grad if grad is None else grad
        if grad is None:
            return
        key = f"{owner}.{local}"
        with self.lock:
            call = self.param_calls[key]
            self.param_calls[key] += 1
        if self.o.mode == "window":
            full = (bool(self.o.window_re.search(owner)) if self.o.window_re is not None
                    else owner in self.full_modules)
        else:
            full = self.o.mode == "full"
        self.add(owner, call, mtype, "param_grad", local, grad, full=full)

    # Records
    def _finish(self, *fields: Any) -> None:
        self.finished.append(fields)  # list.append is atomic

    def records(self) -> list[TraceRecord]:
        return sorted((TraceRecord(*fields) for fields in self.finished), key=lambda r: r.index)

    def _name(self, value: Any) -> str:
        name = self.names.get(value)
        if name is None:
            name = self.names[value] = str(value).removeprefix("torch.")
        return name

    def add(self, module: str, call: int, mtype: str, kind: str, path: str, leaf: Any, *, full: bool) -> None:
        head = (next(self.indices), module, call, mtype, kind, path)
        if not isinstance(leaf, torch.Tensor):
            self._finish(*head, (), type(leaf).__name__, "", None, False, json_value(leaf), False)
            return
        # Metadata needs no detached view: inside a step every tensor operation costs ~10 µs, and
        # every read of ``.device`` builds a new device object.
        device, dtype = leaf.device, leaf.dtype
        meta = (*head, tuple(leaf.shape), self._name(dtype), self._name(device))
        if leaf.layout != torch.strided or device.type == "meta":
            self._finish(*meta, None, False, f"<{leaf.layout} tensor on {device}: not captured>")
            return
        if not (full and dtype in STORABLE):
            self._finish(*meta, self._stats(leaf), False)
            return
        copy = leaf.detach().clone(memory_format=torch.contiguous_format)
        key = record_key(module, call, kind, path)
        if self.writer is None:
            self.tensors[key] = copy
            self._finish(*meta, tensor_stats(copy), True)
        else:
            self.writer.put(key, copy, lambda cpu: self._finish(*meta, tensor_stats(cpu), True))

    def _stats(self, leaf: torch.Tensor) -> TensorStats:
        # One tensor is often recorded several times: a container's output is its last child's,
        # the model's output its last layer's, one gradient reaches several hooks. The same
        # object at the same version counter (bumped by every in-place change) has the same
        # statistics; the weak reference proves it is still that object, not a new one at its id.
        try:
            version = leaf._version
        except RuntimeError:  # inference tensors keep no version counter: measure every time
            return tensor_stats(leaf)
        seen = self.measured.get(id(leaf))
        if seen is not None and seen[0]() is leaf and seen[1] == version:
            return seen[2]
        stats = tensor_stats(leaf)
        self.measured[id(leaf)] = (weakref.ref(leaf), version, stats)
        return stats

    def provenance(self, extra: Mapping[str, Any] | None, rank: int, world: int) -> dict[str, Any]:
        params = list(self.model.parameters()) or list(self.model.buffers())
        device = params[0].device if params else torch.device("cpu")
        o = self.o
        window = (o.window_re.pattern if o.window_re is not None
                  else [o.window_range.start, o.window_range.stop] if o.window_range is not None else None)
        prov: dict[str, Any] = {
            "schema": SCHEMA, **environment(device), "device": str(device),
            "dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or None,
            "model_class": _type_name(self.model), "training": self.model.training,
            "input_hash": self.input_hashes[0] if self.input_hashes else None, "input_hashes": self.input_hashes,
            "command": list(sys.argv), "mode": o.mode, "window": window,
            "include": [p.pattern for p in o.include], "exclude": [p.pattern for p in o.exclude],
            "types": [t if isinstance(t, str) else t.__name__ for t in o.types],
            "inputs": o.inputs, "grads": o.grads, "param_grads": o.param_grads, "rank": rank, "world_size": world,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        prov.update(dict(extra or {}))
        return prov


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
        >>> [(r.layer, r.kind) for r in trace.records if r.kind != "param_grad"][:3]
        [('<model>', 'model_input'), ('0', 'output'), ('1', 'output')]
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"capture needs an nn.Module, not {type(model).__name__}", fix="pass the model itself")
    opts = _options(include, exclude, types, mode, window, inputs, grads, param_grads)
    rank, world = _rank_world(rank)
    folder: Path | None = None
    if out is not None:
        folder = Path(out)
        if world > 1:
            folder.mkdir(parents=True, exist_ok=True)
            folder = folder / f"rank-{rank}"
        folder = prepare_folder(folder)
    writer = TraceWriter(folder, shard_bytes=shard_bytes, queue_bytes=queue_bytes) if folder is not None else None
    recorder = _Recorder(model, opts, writer)
    trace = Trace(mode=mode)
    try:
        recorder.attach()
        yield trace
    except BaseException:
        recorder.detach()
        if writer is not None:
            writer.abort()
        raise
    recorder.detach()
    shards = writer.close() if writer is not None else []
    records = recorder.records()
    prov = recorder.provenance(provenance, rank, world)
    if writer is None or folder is None:
        trace._bind(None, records, prov, None, recorder.tensors)
        return
    write_manifest(folder, build_manifest(records, prov, mode, shards, writer.shard_of))
    trace._bind(folder, records, prov, ShardSet(folder, shards, writer.shard_of, records, verified=True), {})
