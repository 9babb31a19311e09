"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

``torch.distributed.checkpoint.save`` flattens a state dict into fully qualified names
(``model.layer.weight``, ``optim.state.layer.weight.exp_avg``) and writes, per rank, one or more
``__<rank>_<n>.distcp`` files: each item is a complete ``torch.save`` stream appended at some
offset. Tensors are stored as chunks (a rank's shard of the global tensor), non-tensor values as
``torch.save``'d objects ("bytes" items). The pickled ``.metadata`` file (a ``Metadata``
dataclass) maps every name to its global size, dtype and chunks, and every chunk to
``_StorageInfo(relative_path, offset, length, transform_descriptors)``.

Here ``.metadata`` goes through the inert unpickler (the dataclasses come back as placeholders,
their fields read from the recorded ``BUILD`` state), each item is read in place with
:func:`torch_zip.read_object`, and a tensor is assembled from its chunks only on ``load()``. No
process group is needed and ``torch.distributed`` is never imported.

Writing, without a process group and one tensor at a time: ``torch.distributed.checkpoint.save`` wants a state dict of tensors in memory. Its planner only
needs their shapes and dtypes to plan, and asks for each tensor's data only when its writer
reaches it (``SavePlanner.resolve_data``). So the state dict handed over holds *meta* tensors
(shape and dtype, no data), and a planner subclass loads the real tensor at ``resolve_data``.
With one writer thread on a CPU-only machine, torch's writer takes tensors one by one
(``_SerialCpuLoader``), so peak memory is about the largest tensor. On a machine with CUDA,
torch picks its overlapping loader, which keeps up to ``per_thread_copy_ahead`` bytes (set to
0 here, which makes it serial too) in flight.

Values (ints, strings, configs) become DCP "bytes" items, ``torch.save``'d by DCP itself.
Parameters come back as plain tensors: DCP does not record ``nn.Parameter``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorparity._dtypes import TorchDType, dtype_name, to_torch
from tensorparity.checkpoint import torch_zip
from tensorparity.checkpoint._rebuild import rebuild
from tensorparity.checkpoint.layout import detect_sections
from tensorparity.checkpoint.safe_pickle import Placeholder, inert_loads
from tensorparity.checkpoint.tree import Checkpoint, Entry, LazyTensor, PlaceholderInfo, TensorEntry, flatten
from tensorparity.errors import (
    CorruptCheckpointError,
    TensorParityError,
    UnknownFormatError,
    UnsafeCheckpointError,
    UsageError,
)

__all__ = ["METADATA_FILE", "read_dcp", "read_dcp_metadata", "write_dcp"]

_FIX = "the checkpoint is incomplete or corrupt; copy the whole folder again or re-save it with torch.distributed.checkpoint.save"
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_METADATA = 1 << 30
_MAX_GRID_CELLS = 1 << 22  # exact overlap check up to this many cells; volume check beyond
_MAX_DIMS = 64
_RANK_FILE = re.compile(r"__(\d+)_\d+")


@dataclass(frozen=True)
class _Item:
    """One ``torch.save`` stream inside a ``.distcp`` file."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: _Item


class _Meta:
    """Reads fields out of the placeholders the inert unpickler made of ``.metadata``."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self.folder = folder

    def corrupt(self, message: str, key: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f".metadata: {message}", path=self.folder, key=key, fix=_FIX)

    def fields(self, obj: Any, cls: str, key: str | None = None) -> dict[str, Any]:
        """The dataclass fields of a placeholder for ``torch.distributed...<cls>``."""
        if not (isinstance(obj, Placeholder) and obj.name.startswith("torch.distributed.")
                and obj.name.rpartition(".")[2] == cls):
            raise self.corrupt(f"expected a {cls}, found {_short(obj)}", key)
        out: dict[str, Any] = {}
        state = obj.state
        # dataclasses pickle as NEWOBJ + BUILD(__dict__); slotted ones as (dict, slots).
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                out.update(part)
        out.update(getattr(obj, "kwargs", {}))  # NEWOBJ_EX keyword arguments, if any
        return out

    def ints(self, value: Any, what: str, key: str | None) -> tuple[int, ...]:
        if isinstance(value, Placeholder):  # torch.Size from an older pickle
            args = getattr(value, "args", ())
            value = args[0] if args else ()
        if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise self.corrupt(f"{what} is not a tuple of non-negative integers: {_short(value)}", key)
        return tuple(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_metadata(folder: Path) -> tuple[_Meta, dict[str, Any]]:
    path = folder / ".metadata"
    meta = _Meta(path, folder)
    if not path.is_file():
        raise CorruptCheckpointError("the folder has no .metadata file", path=folder, fix=_FIX)
    size = path.stat().st_size
    if size > _MAX_METADATA:
        raise UnsafeCheckpointError(f".metadata of {size} bytes is larger than the {_MAX_METADATA}-byte limit",
                                    path=folder, fix="refusing an implausibly large metadata file")
    try:
        obj = inert_loads(path.read_bytes())
    except TensorParityError as exc:
        # The DCP-level fix, not the pickle's: the user re-saves or re-copies the whole folder.
        raise type(exc)(f".metadata: {exc.message}", path=folder, fix=_FIX) from exc
    return meta, meta.fields(obj, "Metadata")


def _storage_index(meta: _Meta, storage: Any) -> dict[tuple[str, tuple[int, ...] | None], tuple[_Item, tuple[str, ...]]]:
    """``(fqn, chunk offsets)`` -> where the item is and its stream transforms."""
    if not isinstance(storage, dict):
        raise meta.corrupt(f"storage_data is not a mapping: {_short(storage)}")
    out: dict[tuple[str, tuple[int, ...] | None], tuple[_Item, tuple[str, ...]]] = {}
    for index, info in storage.items():
        where = meta.fields(index, "MetadataIndex")
        fqn = where.get("fqn")
        if not isinstance(fqn, str):
            raise meta.corrupt(f"storage key without a name: {_short(index)}")
        offset = where.get("offset")
        offsets = None if offset is None else meta.ints(offset, "chunk offset", fqn)
        fields = meta.fields(info, "_StorageInfo", fqn)
        name, start, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
        if not (isinstance(name, str) and isinstance(start, int) and isinstance(length, int)
                and not isinstance(start, bool) and not isinstance(length, bool) and start >= 0 and length >= 0):
            raise meta.corrupt(f"malformed storage entry {_short(fields)}", fqn)
        transforms = fields.get("transform_descriptors") or ()
        if not isinstance(transforms, (list, tuple)):
            raise meta.corrupt(f"transform_descriptors is not a list: {_short(transforms)}", fqn)
        out[(fqn, offsets)] = (_Item(name, start, length), tuple(str(t) for t in transforms))
    return out


def _check_item(folder: Path, fqn: str, item: _Item, transforms: tuple[str, ...], sizes: dict[str, int]) -> None:
    """Refuse unsafe names, missing files, items past the end and unreadable transforms."""
    name = item.file
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
            or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name)):
        raise UnsafeCheckpointError(
            f".metadata names the data file {name!r}, which is not a plain file name in the folder",
            path=folder, key=fqn, fix="refusing a path that could leave the checkpoint folder; "
                                      "only open checkpoints from sources you trust")
    if name not in sizes:
        file = folder / name
        if not file.is_file():
            raise CorruptCheckpointError(
                f"data file {name} named by .metadata is missing", path=folder, key=fqn,
                fix=f"copy every *.distcp file of the checkpoint into the folder ({name} is missing)")
        sizes[name] = file.stat().st_size
    if item.offset + item.length > sizes[name]:
        raise CorruptCheckpointError(
            f"item [{item.offset}, {item.offset + item.length}) runs past the end of {name} ({sizes[name]} bytes)",
            path=folder, key=fqn, fix=f"{name} is truncated; copy it again")
    if transforms:
        raise UnknownFormatError(
            f"item in {name} is stored through stream transform(s) {list(transforms)} (e.g. zstd compression), "
            "which tensorparity does not read", path=folder, key=fqn,
            fix="re-save without _extensions, or convert it with "
                "torch.distributed.checkpoint.format_utils.dcp_to_torch_save and open the .pt file")


def _check_streams(folder: Path, items: list[tuple[str, _Item]]) -> None:
    """Each item must start as a torch.save zip: DCP's SAFETENSORS serialization is not one."""
    by_file: dict[str, list[tuple[str, _Item]]] = {}
    for fqn, item in items:
        by_file.setdefault(item.file, []).append((fqn, item))
    for name, group in by_file.items():
        with open(folder / name, "rb") as f:
            for fqn, item in sorted(group, key=lambda p: p[1].offset):
                f.seek(item.offset)
                if f.read(4) != _ZIP_MAGIC:
                    raise UnknownFormatError(
                        f"item at offset {item.offset} of {name} is not a torch.save stream "
                        "(saved with serialization_format=SAFETENSORS?)", path=folder, key=fqn,
                        fix="re-save it with FileSystemWriter's default serialization_format (torch_save)")


def _tiling_problem(size: tuple[int, ...], chunks: list[_Chunk]) -> str | None:
    """Why the chunks do not cover ``size`` exactly once, or None when they do."""
    for c in chunks:
        if len(c.offsets) != len(size) or len(c.sizes) != len(size):
            return f"chunk at {list(c.offsets)} has {len(c.sizes)} dimensions, the tensor {len(size)}"
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, size)):
            return f"chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside the tensor of size {list(size)}"
    total = math.prod(size)
    if total == 0:
        return None
    covered = sum(math.prod(c.sizes) for c in chunks)
    if covered != total:
        return f"chunks hold {covered} elements but the tensor has {total}"
    # Equal volume plus no overlap means an exact tiling; check overlap on the grid of chunk edges.
    edges = [sorted({0, n, *(c.offsets[d] for c in chunks), *(c.offsets[d] + c.sizes[d] for c in chunks)})
             for d, n in enumerate(size)]
    cells = math.prod(len(e) - 1 for e in edges)
    if cells > _MAX_GRID_CELLS:
        return None
    grid = np.zeros([len(e) - 1 for e in edges], dtype=np.int32)
    cell = [{edge: i for i, edge in enumerate(e)} for e in edges]
    for c in chunks:
        if math.prod(c.sizes) == 0:
            continue
        index = tuple(slice(at[o], at[o + s]) for at, o, s in zip(cell, c.offsets, c.sizes))
        grid[index] += 1
    if (grid != 1).any():
        return "chunks overlap and leave gaps"
    return None


def _read_item(folder: Path, fqn: str, item: _Item) -> tuple[Any, list[Any]]:
    shown = f"{folder / item.file} @ {item.offset}"
    try:
        obj, _, closers = torch_zip.read_object(folder / item.file, offset=item.offset, length=item.length,
                                                display=shown)
    except TensorParityError as exc:
        raise type(exc)(f"item at offset {item.offset} of {item.file}: {exc.message}", path=folder,
                        key=fqn, fix=exc.fix or _FIX) from exc
    return obj, closers


def _load_chunk(folder: Path, fqn: str, chunk: _Chunk, dtype: torch.dtype) -> torch.Tensor:
    obj, closers = _read_item(folder, fqn, chunk.item)
    try:
        if not isinstance(obj, LazyTensor) or obj.shape != chunk.sizes or dtype_name(obj.dtype) != dtype_name(dtype):
            got = (f"{list(obj.shape)} {to_torch(obj.dtype)}" if isinstance(obj, LazyTensor) else type(obj).__name__)
            raise CorruptCheckpointError(
                f"chunk at {list(chunk.offsets)} in {chunk.item.file} holds {got}, "
                f".metadata says {list(chunk.sizes)} {dtype}", path=folder, key=fqn, fix=_FIX)
        return obj.loader()
    finally:
        for close in closers:
            close()  # the mapping stays alive as long as the returned view does


def _lazy_tensor(folder: Path, fqn: str, size: tuple[int, ...], dtype: torch.dtype,
                 chunks: list[_Chunk], requires_grad: bool) -> LazyTensor:
    def load() -> torch.Tensor:
        if len(chunks) == 1 and chunks[0].sizes == size:
            return _load_chunk(folder, fqn, chunks[0], dtype)  # a view of the mapped file, no copy
        out = torch.empty(size, dtype=dtype)
        for chunk in chunks:
            if math.prod(chunk.sizes):
                window = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
                out[window].copy_(_load_chunk(folder, fqn, chunk, dtype))
        return out

    files = sorted({c.item.file for c in chunks})
    if len(chunks) == 1:
        location = f"{folder / chunks[0].item.file} @ {chunks[0].item.offset}"
    else:
        location = f"{len(chunks)} chunks in {', '.join(files)}"
    note = f"assembled from {len(chunks)} chunks" if len(chunks) > 1 else None
    return LazyTensor(size, dtype, math.prod(size) * dtype.itemsize, location, load,
                      requires_grad=requires_grad, note=note)


def _tensor_properties(meta: _Meta, fields: dict[str, Any], fqn: str) -> tuple[torch.dtype, bool]:
    props = meta.fields(fields.get("properties"), "TensorProperties", fqn)
    # TensorProperties pickles its state as a tuple (dtype, layout, requires_grad, memory format,
    # pin_memory); older releases pickled the plain field dict instead.
    state = fields["properties"].state
    dtype: Any
    if isinstance(state, tuple) and state and isinstance(state[0], TorchDType):
        dtype, requires_grad = state[0], len(state) > 2 and state[2] is True
    else:
        dtype, requires_grad = props.get("dtype"), props.get("requires_grad") is True
    if not isinstance(dtype, TorchDType):
        raise meta.corrupt(f"tensor properties without a dtype: {_short(state)}", fqn)
    try:
        return to_torch(dtype), requires_grad
    except ValueError as exc:
        raise meta.corrupt(f"tensor properties name an unknown dtype: {_short(state)}", fqn) from exc


def read_dcp(path: Path) -> Checkpoint:
    """Open a torch.distributed.checkpoint folder as a :class:`Checkpoint`, without a process group.

    Keys are DCP's fully qualified names; a tensor saved as several ranks' chunks is one entry,
    assembled from its chunks on ``load()``. Non-tensor values are read (inertly) at open.

    Args:
        path: the folder holding ``.metadata`` and the ``*.distcp`` files.

    Returns:
        A :class:`Checkpoint` of format ``dcp``.

    Raises:
        CorruptCheckpointError: a file is missing or truncated, or the chunks do not tile a tensor.
        UnsafeCheckpointError: ``.metadata`` names a file outside the folder.
        UnknownFormatError: items are compressed or not ``torch.save`` streams.

    Example:
        >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
        >>> folder = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = dcp.save({"model": {"w": torch.ones(2)}, "step": 3}, checkpoint_id=folder)
        >>> ckpt = read_dcp(Path(folder))
        >>> ckpt["model.w"].load(), ckpt["step"].value, ckpt.section_of("model.w")
        (tensor([1., 1.]), 3, 'model')
    """
    folder = Path(path)
    meta, fields = _read_metadata(folder)
    described = fields.get("state_dict_metadata")
    if not isinstance(described, dict):
        raise meta.corrupt(f"state_dict_metadata is not a mapping: {_short(described)}")
    storage = _storage_index(meta, fields.get("storage_data"))
    planner = fields.get("planner_data")

    sizes: dict[str, int] = {}
    used: list[tuple[str, _Item]] = []
    plan: list[tuple[str, Any]] = []  # (fqn, chunks + tensor facts, or the bytes item)
    for fqn, desc in described.items():
        if not isinstance(fqn, str):
            raise meta.corrupt(f"state_dict_metadata key is not a string: {_short(fqn)}")
        kind = desc.name.rpartition(".")[2] if isinstance(desc, Placeholder) else ""
        if kind == "BytesStorageMetadata":
            found = storage.get((fqn, None))
            if found is None:
                raise meta.corrupt("value has no storage entry", fqn)
            _check_item(folder, fqn, *found, sizes)
            used.append((fqn, found[0]))
            plan.append((fqn, found[0]))
            continue
        tensor = meta.fields(desc, "TensorStorageMetadata", fqn)
        size = meta.ints(tensor.get("size"), "tensor size", fqn)
        dtype, requires_grad = _tensor_properties(meta, tensor, fqn)
        raw_chunks = tensor.get("chunks")
        if not isinstance(raw_chunks, list):
            raise meta.corrupt(f"tensor chunks are not a list: {_short(raw_chunks)}", fqn)
        chunks: list[_Chunk] = []
        for raw in raw_chunks:
            c = meta.fields(raw, "ChunkStorageMetadata", fqn)
            offsets = meta.ints(c.get("offsets"), "chunk offsets", fqn)
            found = storage.get((fqn, offsets))
            if found is None:
                raise meta.corrupt(f"chunk at offsets {list(offsets)} has no storage entry", fqn)
            _check_item(folder, fqn, *found, sizes)
            chunk = _Chunk(offsets, meta.ints(c.get("sizes"), "chunk sizes", fqn), found[0])
            # A torch.save stream holds at least the chunk's bytes: this bounds what load() allocates.
            need = math.prod(chunk.sizes) * dtype.itemsize
            if need > chunk.item.length:
                raise meta.corrupt(f"chunk at offsets {list(offsets)} needs {need} bytes but its item in "
                                   f"{chunk.item.file} holds {chunk.item.length}", fqn)
            chunks.append(chunk)
            used.append((fqn, found[0]))
        problem = _tiling_problem(size, chunks)
        if problem:
            raise CorruptCheckpointError(f"the chunks do not tile the tensor of size {list(size)}: {problem}",
                                         path=folder, key=fqn, fix=_FIX)
        plan.append((fqn, (size, dtype, chunks, requires_grad)))
    _check_streams(folder, used)

    entries: dict[str, Entry] = {}
    placeholders: list[PlaceholderInfo] = []
    closers: list[Any] = []
    tops: dict[str, Any] = {}  # top-level names -> a stand-in value, for section detection
    routed: list[tuple[Any, Any]] = []  # (planner route, value): the nesting, for writers
    for fqn, what in plan:
        if isinstance(what, _Item):
            try:
                value, item_closers = _read_item(folder, fqn, what)
            except TensorParityError:
                for close in closers:
                    close()
                raise
            closers.extend(item_closers)
        else:
            value = _lazy_tensor(folder, fqn, *what)
        entries.update(flatten(value, prefix=fqn, placeholders=placeholders))
        route = planner.get(fqn) if isinstance(planner, dict) else None
        routed.append((route, value))
        top = str(route[0]) if isinstance(route, tuple) and route else fqn.split(".", 1)[0]
        tops[top] = value if top == fqn else {"": None}

    framework, sections, found_prov = detect_sections(tops)
    provenance: dict[str, Any] = {"files": len(sizes)}
    ranks = {m.group(1) for name in sizes if (m := _RANK_FILE.fullmatch(name.removesuffix(".distcp")))}
    if ranks:
        provenance["ranks"] = len(ranks)
    if isinstance(fields.get("version"), str):
        provenance["dcp_version"] = fields["version"]
    if isinstance(planner, dict):
        provenance["planner_data"] = len(planner)
    if framework:
        provenance["framework"] = framework
    provenance.update(found_prov)
    return Checkpoint(source=str(folder), format="dcp", entries=entries, sections=sections,
                      provenance=provenance, placeholders=placeholders, closers=closers,
                      structure=_nest([(fqn, r, v) for (fqn, _), (r, v) in zip(plan, routed)]))


def _nest(items: list[tuple[str, Any, Any]]) -> Any:
    """Re-nest values along DCP's planner routes (a str is a dict key, an int a list index, as
    DCP's own ``unflatten_state_dict`` does); ``None`` when a route is missing or contradictory."""
    root: dict[Any, Any] = {}
    for fqn, route, value in items:
        if not (isinstance(route, tuple) and route and isinstance(route[0], str)
                and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in route)
                and ".".join(map(str, route)) == fqn):
            return None
        node: Any = root
        for part, nxt in zip(route, route[1:]):
            fresh: Any = [] if isinstance(nxt, int) else {}
            if isinstance(node, dict) and isinstance(part, str):
                node = node.setdefault(part, fresh)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part <= len(node) < 1 << 20:
                if part == len(node):
                    node.append(fresh)
                node = node[part]
            else:
                return None
            if not isinstance(node, type(fresh)):
                return None
        last = route[-1]
        if isinstance(node, dict) and isinstance(last, str) and last not in node:
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last == len(node):
            node.append(value)
        else:
            return None
    return root


# ---------------------------------------------------------------------------------------------
# Writing

METADATA_FILE = "tensorparity_metadata.json"


def read_dcp_metadata(folder: Path) -> dict[str, str]:
    """The strings :func:`write_dcp` recorded beside a DCP checkpoint (empty when none)."""
    path = folder / METADATA_FILE
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _planner(lazy: dict[int, TensorEntry]) -> Any:
    from torch.distributed.checkpoint import DefaultSavePlanner

    class LazyPlanner(DefaultSavePlanner):  # type: ignore[misc]
        """Loads each tensor when torch's writer asks for it, not before."""

        def lookup_object(self, index: Any) -> Any:
            found = super().lookup_object(index)
            entry = lazy.get(id(found))
            return torch_zip.load_checked(entry) if entry is not None else found

    return LazyPlanner()


def write_dcp(ckpt: Checkpoint, dest: Path, *, structure: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ckpt`` as a single-process DCP checkpoint folder at ``dest`` (created)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    lazy: dict[int, TensorEntry] = {}

    def meta(entry: TensorEntry) -> torch.Tensor:
        t = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        if entry.requires_grad and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        lazy[id(t)] = entry
        return t

    state = rebuild(ckpt, structure, meta)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UsageError("a DCP checkpoint needs a dict with string keys at the top", path=dest,
                         fix="write torch or safetensors instead")
    dest.mkdir()
    writer = FileSystemWriter(dest, single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is.
            warnings.simplefilter("ignore")
            save(state, storage_writer=writer, planner=_planner(lazy), no_dist=True)
    except CheckpointException as exc:
        # DCP wraps what failed (a full disk, a tensor that could not be read) in a BaseException,
        # which no `except Exception` would catch: hand the first cause on as it was raised.
        causes = [cause for cause, _ in exc.failures.values()]
        raise (causes[0] if causes else RuntimeError(str(exc))) from None
    if metadata:
        (dest / METADATA_FILE).write_text(json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False),
                                          encoding="utf-8")
