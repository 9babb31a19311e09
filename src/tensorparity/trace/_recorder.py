"""The hooks of one capture and what they have recorded so far (private: see
:mod:`tensorparity.trace.capture` for what is recorded, the call-site rule and the parameters)."""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tensorparity.checkpoint._wrappers import WrapperNames, wrapper_attr
from tensorparity.checkpoint.tracefolder._dtensor import as_recorded, is_dtensor, sharded
from tensorparity.checkpoint.tracefolder.format import STORABLE
from tensorparity.checkpoint.tracefolder.records import (
    SCHEMA,
    TensorStats,
    TraceRecord,
    flatten_value,
    json_value,
    record_key,
    tensor_stats,
)
from tensorparity.checkpoint.tracefolder.writer import TraceWriter
from tensorparity.mapping._param_signature import param_signature
from tensorparity.trace.seed import environment, input_hash

if TYPE_CHECKING:
    from tensorparity.trace._capture import Options

__all__ = ["Recorder", "type_name"]

MAX_PATHS = 200_000  # module paths walked to name shared modules (a cycle or a huge fan-out stops there)


def call_leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    # Positional arguments are "0", "1", ...; keyword arguments their names (never digits).
    return (flatten_value(list(args)) if args else []) + (flatten_value(kwargs) if kwargs else [])


def type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def in_backward() -> bool:
    # Activation checkpointing re-runs forwards during backward; those calls are not new records.
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def alias_paths(model: nn.Module, registered: Mapping[int, str], names: WrapperNames | None = None
                ) -> dict[int, list[str]]:
    """Every path of every module, its registered path first: a module held by several parents
    (one activation shared by every block) has one path per parent, as
    ``named_modules(remove_duplicate=False)`` lists them, walked without recursion (a cyclic
    graph stops at :data:`MAX_PATHS` paths or 64 levels). A wrapper's attribute (DDP's
    ``module``, ``_orig_mod``, ...; see ``names``) adds no component."""
    paths: dict[int, list[str]] = {}
    todo: list[tuple[str, nn.Module, int]] = [("", model, 0)]
    walked = 0
    while todo and walked < MAX_PATHS:
        prefix, module, depth = todo.pop()
        found = paths.get(id(module))
        if found is None:
            paths[id(module)] = [prefix]
        else:
            found.append(prefix)
        walked += 1
        if depth < 64:
            skip = wrapper_attr(module) if names is not None and names.is_wrapper(module) else None
            children = [(prefix if name == skip else f"{prefix}.{name}" if prefix else name, child, depth + 1)
                        for name, child in module._modules.items() if child is not None]
            todo.extend(reversed(children))
    for key, found in paths.items():
        first = registered.get(key)
        if len(found) > 1 and first is not None and found[0] != first and first in found:
            found.remove(first)
            found.insert(0, first)
    return paths


class Recorder:
    """The hooks of one capture and what they have recorded so far."""

    def __init__(self, model: nn.Module, opts: Options, writer: TraceWriter | None) -> None:
        self.model, self.o, self.writer = model, opts, writer
        self.lock = threading.Lock()
        self.indices = itertools.count()  # next() is atomic: hooks of several threads number records
        # Records as tuples, made TraceRecords once the block exits: inside a step a frozen
        # dataclass costs ~8 µs to build (cold caches), a tuple a fraction of it.
        self.finished: list[tuple[Any, ...]] = []
        self.names: dict[Any, str] = {}  # str() of dtypes and devices, by value
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.ordinal = 0
        self.full_calls: set[tuple[str, int]] = set()
        self.full_modules: set[str] = set()
        self.param_calls: dict[str, int] = defaultdict(int)
        self.input_hashes: list[str] = []
        self.measured: dict[int, tuple[Any, int, TensorStats]] = {}
        self.stored: dict[int, tuple[Any, int, str, TensorStats]] = {}  # id -> (weakref, version, key, stats)
        self.handles: list[Any] = []
        self.active = True
        # Call sites: the modules running now, per thread, as (module, recorded name, call,
        # selected); where a module called from another running module is recorded, cached by
        # (caller's id, caller's recorded name, module's id); recorded name -> registered name.
        self.local = threading.local()
        self.sites: dict[tuple[int, str, int], tuple[str, bool]] = {}
        self.call_sites: dict[str, str] = {}
        self.paths: dict[int, list[str]] = {}
        self.all_paths: set[str] = set()
        # Parameters: (owner, owner type, local name, parameter); their records by key until the
        # block exits (a window decided later replaces a statistics row by a stored one).
        self.params: list[tuple[str, str, str, nn.Parameter]] = []
        self.params_done = False
        self.param_rows: dict[str, tuple[Any, ...]] = {}
        self.pending: dict[str, list[tuple[str, str, nn.Parameter, int]]] = {}
        # Parameter gradients are read once backward has finished (after DDP's all-reduce and
        # FSDP's reduce-scatter, which finish in the engine's final callbacks): placed here by
        # the post-accumulate hooks with their index, recorded by the callback queued last.
        self.final_grads: list[tuple[int, str, int, str, str, torch.Tensor]] = []
        self.grad_callback = False
        self.wrappers = WrapperNames(model)

    # Hooks
    def attach(self) -> None:
        raw_modules = list(self.model.named_modules())
        # Wrappers (DDP, FSDP1, activation checkpointing, torch.compile) are transparent: not
        # hooked, and their attribute is no part of any name; the module they wrap takes their name.
        modules = [(self.wrappers.clean(name), m) for name, m in raw_modules if not self.wrappers.is_wrapper(m)]
        self.paths = alias_paths(self.model, {id(m): name for name, m in modules}, self.wrappers)
        self.all_paths = {p for found in self.paths.values() for p in found}
        for name, module in modules:
            selected = name == "" or self.o.selected(name, module)
            kw = {"name": name, "mtype": type_name(module), "selected": selected}
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._pre, **kw), with_kwargs=True))
            post = functools.partial(self._post, **kw)
            try:  # always_call: a forward that raises still ends its call (torch >= 2.1)
                handle = module.register_forward_hook(post, with_kwargs=True, always_call=True)
            except TypeError:
                handle = module.register_forward_hook(post, with_kwargs=True)
            self.handles.append(handle)
        owners = dict(raw_modules)
        for pname, param in self.model.named_parameters():
            raw_owner, _, local = pname.rpartition(".")
            module, owner = owners[raw_owner], self.wrappers.clean(raw_owner)
            if owner and not self.o.selected(owner, module):
                continue
            if self.o.params:
                self.params.append((owner, type_name(module), local, param))
            if not (self.o.param_grads and param.requires_grad):
                continue
            hook = functools.partial(self._param_grad, owner, type_name(module), local)
            if hasattr(param, "register_post_accumulate_grad_hook"):
                self.handles.append(param.register_post_accumulate_grad_hook(hook))
            else:  # torch < 2.1: the gradient as it arrives, before accumulation
                self.handles.append(param.register_hook(lambda g, hook=hook, p=param: hook(p, g)))

    def header_estimate(self) -> int:
        """Bytes a shard header will take for one call of every hooked module (the writer's first
        header room): per stored tensor its key and ~130 bytes (its entry, its padding's, commas)."""
        names = [name for name, _ in self.model.named_modules()]
        per_module = 2 + (2 if self.o.inputs else 0) if self.o.mode != "stats" else 0
        tensors = [(name, per_module) for name in names] + [(owner, 2) for owner, *_ in self.params]
        if self.o.mode != "stats" and self.o.param_grads:
            tensors += [(n.rpartition(".")[0], 1) for n, p in self.model.named_parameters() if p.requires_grad]
        return 1024 + sum(count * (len(name) + 130) for name, count in tensors)

    def detach(self) -> None:
        self._record_final_grads()  # a backward whose end never came (it raised): what it has
        self.active = False
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        self.local = threading.local()  # a forward that raised leaves no running module behind

    def _stack(self) -> list[tuple[Any, ...]]:
        try:
            return self.local.stack  # type: ignore[no-any-return]
        except AttributeError:
            stack: list[tuple[Any, ...]] = []
            self.local.stack = stack
            return stack

    def _site(self, module: nn.Module, name: str, selected: bool, caller: tuple[Any, ...]) -> tuple[str, bool]:
        """Where a call of ``module`` (registered as ``name``) made from ``caller`` is recorded."""
        x_mod, x_name = caller[0], caller[1]
        if not name or x_mod is module:
            site = x_name if name else ""
        else:
            rel = self._relative(x_mod, module)
            if rel is not None:  # the caller holds it: the path through the caller
                site = f"{x_name}.{rel}" if x_name else rel
            else:  # called from outside its tree: named after the caller unless that names another module
                last = name.rpartition(".")[2]
                site = f"{x_name}.{last}" if x_name else last
                if site in self.all_paths:
                    site = name
        if site != name:
            self.call_sites[site] = name
            selected = self.o.selected(site, module)
        found = self.sites[(id(x_mod), x_name, id(module))] = (site, selected)
        return found

    def _relative(self, ancestor: nn.Module, module: nn.Module) -> str | None:
        # Every path of the ancestor leads to the same subtree: its registered one is enough.
        above, below = self.paths.get(id(ancestor)), self.paths.get(id(module))
        if not above or not below:
            return None
        head = above[0]
        for path in below:  # the registered path first
            if not head:
                return path
            if path.startswith(head) and path[len(head):len(head) + 1] == ".":
                return path[len(head) + 1:]
        return None

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, name: str, mtype: str,
             selected: bool) -> None:
        if not self.active or in_backward():
            return
        stack = self._stack()
        site = name
        if stack:
            top = stack[-1]
            found = self.sites.get((id(top[0]), top[1], id(module)))
            site, selected = found if found is not None else self._site(module, name, selected, top)
        with self.lock:
            call = self.calls[site]
            self.calls[site] += 1
            ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        stack.append((module, site, call, selected))
        full = self.o.full(site, ordinal)
        if full:
            self.full_calls.add((site, call))
            self.full_modules.add(site)
            self.full_modules.add(name)
            if self.pending and name in self.pending:
                self._store_pending(name)
        if name == "":
            self.input_hashes.append(input_hash(*args, **kwargs))
            for path, leaf in call_leaves(args, kwargs):
                self.add(name, call, mtype, "model_input", path, leaf, full=True)
            if not self.params_done:
                self.params_done = True
                self._record_params()
        elif selected and self.o.inputs:
            for path, leaf in call_leaves(args, kwargs):
                self.add(site, call, mtype, "input", path, leaf, full=full)
                if self.o.grads:
                    self._grad_hook(leaf, site, call, mtype, "grad_input", path, full)

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, *, name: str,
              mtype: str, selected: bool) -> None:
        if not self.active or in_backward():
            return
        stack = self._stack()
        entry = stack.pop() if stack and stack[-1][0] is module else _unwind(stack, module)
        if output is None and sys.exc_info()[0] is not None:
            return  # the forward raised: the call ends without an output
        if entry is None:  # its pre-hook did not run (the block began inside this call)
            site, call = name, self.calls[name] - 1
        else:
            _, site, call, selected = entry
        if not selected:
            return
        full = (site, call) in self.full_calls
        kind = "model_output" if name == "" else "output"
        for path, leaf in flatten_value(output):
            self.add(site, call, mtype, kind, path, leaf, full=full)
            if self.o.grads:
                self._grad_hook(leaf, site, call, mtype, "grad_output", path, full)

    def _grad_hook(self, leaf: Any, name: str, call: int, mtype: str, kind: str, path: str, full: bool) -> None:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            hook = functools.partial(self._on_grad, name, call, mtype, kind, path, full)
            self.handles.append(leaf.register_hook(hook))

    def _on_grad(self, name: str, call: int, mtype: str, kind: str, path: str, full: bool,
                 grad: torch.Tensor) -> None:
        if self.active and grad is not None:
            self.add(name, call, mtype, kind, path, grad, full=full)

    def _owner_full(self, owner: str) -> bool:
        if self.o.mode != "window":
            return self.o.mode == "full"
        if self.o.window_re is not None:
            return bool(self.o.window_re.search(owner))
        return owner in self.full_modules

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
        full = self._owner_full(owner)
        index = next(self.indices)  # its place: where it arrived in the backward pass
        if self.o.local_grads and not is_dtensor(grad):
            # This rank's own gradient, before DDP's all-reduce (which runs in DDP's hooks after
            # this one, and finishes as backward ends): a missing or wrong all-reduce shows here.
            self.add(owner, call, mtype, "param_grad_local", local, grad, full=full)
        if not self._queue_final(index, owner, call, mtype, local, param):
            self.add(owner, call, mtype, "param_grad", local, grad, full=full, index=index)

    def _queue_final(self, index: int, owner: str, call: int, mtype: str, local: str, param: torch.Tensor) -> bool:
        """Read this parameter's gradient once backward ends: a callback queued now runs after
        the callbacks already queued (FSDP's) and queues one more, which runs after those queued
        later in this backward (DDP's reducer queues its ``finalize_backward`` when its last
        bucket is ready); ``False`` where no backward is running to queue into."""
        with self.lock:
            self.final_grads.append((index, owner, call, mtype, local, param))
            if self.grad_callback:
                return True
            try:
                engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
                engine.queue_callback(lambda: engine.queue_callback(self._record_final_grads))
            except (AttributeError, RuntimeError):  # not inside backward: read it now
                self.final_grads.pop()
                return False
            self.grad_callback = True
        return True

    def _record_final_grads(self) -> None:
        with self.lock:
            pending, self.final_grads, self.grad_callback = self.final_grads, [], False
        if not self.active:
            return
        for index, owner, call, mtype, local, param in pending:
            if param.grad is not None:
                self.add(owner, call, mtype, "param_grad", local, param.grad, full=self._owner_full(owner), index=index)

    # Parameters
    def _record_params(self) -> None:
        """Every parameter once, as the model's first forward is about to use it."""
        later = self.o.mode == "window" and self.o.window_re is None  # a range: known as calls begin
        for index, (owner, mtype, local, param) in enumerate(self.params):  # numbered last: see records()
            full = self._owner_full(owner)
            self._add_param(owner, mtype, local, param, index, full)
            if later and not full:
                self.pending.setdefault(owner, []).append((mtype, local, param, index))

    def _store_pending(self, owner: str) -> None:
        for mtype, local, param, index in self.pending.pop(owner, ()):
            self._add_param(owner, mtype, local, param, index, True)

    def _add_param(self, owner: str, mtype: str, local: str, param: torch.Tensor, index: int, full: bool) -> None:
        key = record_key(owner, 0, "param", local)
        placement = None
        if is_dtensor(param):
            param, placement = as_recorded(param, self.o.dtensor)
        self.add(owner, 0, mtype, "param", local, param, full=full, index=index,
                 finish=functools.partial(self._param_row, key), placement=placement)
        if (not full and param.layout == torch.strided and param.device.type != "meta"
                and not sharded(placement)):  # a shard's signature is not the parameter's
            # Not stored: its content signature is (row and column digests, R + C int64), from
            # which compare finds the mapping to another implementation as from the tensor.
            digests = param_signature(param.detach()).to_tensors()[0]
            sig = record_key(owner, 0, "param_signature", local)
            self.add(owner, 0, mtype, "param_signature", local, digests, full=True, index=index,
                     finish=functools.partial(self._param_row, sig))

    def _param_row(self, key: str, *fields: Any) -> None:
        self.param_rows[key] = fields  # dict assignment is atomic; a stored row replaces a statistics one

    # Records
    def _finish(self, *fields: Any) -> None:
        self.finished.append(fields)  # list.append is atomic

    def records(self) -> list[TraceRecord]:
        # Parameters are numbered after everything else, in model order: the run's own records
        # keep the indices they have without them (and a layer's first record is never one).
        params = [(next(self.indices), *row[1:]) for row in sorted(self.param_rows.values(), key=lambda r: r[0])]
        return sorted((TraceRecord(*fields) for fields in [*self.finished, *params]), key=lambda r: r.index)

    def _name(self, value: Any) -> str:
        name = self.names.get(value)
        if name is None:
            name = self.names[value] = str(value).removeprefix("torch.")
        return name

    def add(self, module: str, call: int, mtype: str, kind: str, path: str, leaf: Any, *, full: bool,
            index: int | None = None, finish: Any = None, placement: dict[str, Any] | None = None) -> None:
        finish = finish or self._finish
        head = (next(self.indices) if index is None else index, module, call, mtype, kind, path)
        if not isinstance(leaf, torch.Tensor):
            finish(*head, (), type(leaf).__name__, "", None, False, json_value(leaf), False)
            return
        if placement is None and is_dtensor(leaf):
            leaf, placement = as_recorded(leaf, self.o.dtensor)
        if placement is not None:  # the record's last fields: value, is_tensor, placement
            finish = functools.partial(_with_placement, finish, placement)
        # Metadata needs no detached view: inside a step every tensor operation costs ~10 µs, and
        # every read of ``.device`` builds a new device object.
        device, dtype = leaf.device, leaf.dtype
        meta = (*head, tuple(leaf.shape), self._name(dtype), self._name(device))
        if leaf.layout != torch.strided or device.type == "meta":
            finish(*meta, None, False, f"<{leaf.layout} tensor on {device}: not captured>")
            return
        if not (full and dtype in STORABLE):
            finish(*meta, self._stats(leaf), False)
            return
        key = record_key(module, call, kind, path)
        if self.writer is None:
            copy = leaf.detach().clone(memory_format=torch.contiguous_format)
            self.tensors[key] = copy
            finish(*meta, tensor_stats(copy), True)
            return
        # The writer copies it before it returns (into reused memory: no clone to fault in). One
        # tensor recorded again unchanged (a container's output is its last child's, one gradient
        # reaches several hooks) is stored once: the later records name the first (same_as).
        try:
            version = leaf._version
        except RuntimeError:  # inference tensors keep no version counter: stored every time
            version = None
        seen = self.stored.get(id(leaf)) if version is not None else None
        if seen is not None and seen[0]() is leaf and seen[1] == version:
            self.writer.same_as(key, seen[2])
            finish(*meta, seen[3], True)
            return

        ident, ref = id(leaf), weakref.ref(leaf) if version is not None else None

        def done(stats: TensorStats) -> None:
            if ref is not None:  # measured as copied: later records of this tensor (unchanged) point here
                self.stored[ident] = (ref, version, key, stats)
            finish(*meta, stats, True)

        self.writer.put(key, leaf, done)

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
            "model_class": type_name(self.model), "training": self.model.training,
            "input_hash": self.input_hashes[0] if self.input_hashes else None, "input_hashes": self.input_hashes,
            "command": list(sys.argv), "mode": o.mode, "window": window,
            "include": [p.pattern for p in o.include], "exclude": [p.pattern for p in o.exclude],
            "types": [t if isinstance(t, str) else t.__name__ for t in o.types],
            "inputs": o.inputs, "grads": o.grads, "param_grads": o.param_grads, "params": o.params,
            "call_sites": dict(sorted(self.call_sites.items())), "rank": rank, "world_size": world,
            "dtensor": o.dtensor, "local_grads": o.local_grads, "param_grads_read": "end of backward",
            "name_prefixes_removed": self.wrappers.removed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        prov.update(dict(extra or {}))
        return prov


def _unwind(stack: list[tuple[Any, ...]], module: nn.Module) -> tuple[Any, ...] | None:
    """Pop ``module``'s entry and every entry above it: calls inside it that raised and were
    caught never ended (without ``always_call``). ``None``, and the stack kept, if it is not there."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] is module:
            entry = stack[i]
            del stack[i:]
            return entry
    return None


def _with_placement(finish: Any, placement: dict[str, Any], *fields: Any) -> None:
    finish(*fields, None, True, placement)
