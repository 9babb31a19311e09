"""Stream a checkpoint into a torch zip, one tensor in memory at a time.

``torch.save`` pickles the whole object with every tensor in memory, then writes the storages.
Here the pickle is made from *metadata*: every tensor is a stand-in whose ``__reduce_ex__``
emits exactly what a real tensor emits (``torch._utils._rebuild_tensor_v2`` over a persistent
storage id, or ``_rebuild_tensor_v3`` for dtypes without a typed storage, wrapped in
``_rebuild_parameter`` for parameters), so ``torch.load(weights_only=True)`` reads the result as
it reads ``torch.save``'s. Then each storage is loaded, written as its own 64-byte aligned
record by torch's own ``PyTorchFileWriter``, and dropped before the next.

Storages are written dense and in C order. Tensors whose bytes are the very same bytes of the
source file (tied weights that ``torch.save`` stored once, a tie a migration added) share one
storage again, so they load tied and are stored once. Other sharing (a slice or a transposed view
of another tensor, tensors of an in-memory dict) is written as copies: the same values, more
bytes, no tie after loading.

The nested structure of the source (Lightning sections, optimizer state lists, int keys, dicts
whose keys hold dots) comes from the reader's ``Checkpoint.structure``; see :mod:`._layout`.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch

from tensorparity.checkpoint._rebuild import rebuild
from tensorparity.checkpoint.tree import Checkpoint, TensorEntry
from tensorparity.errors import CorruptCheckpointError, UsageError

__all__ = ["METADATA_RECORD", "iter_loaded", "load_checked", "write_torch_zip"]

METADATA_RECORD = ".data/tensorparity_metadata.json"  # inside the archive folder; torch.load ignores it
_STORAGE_TYPES = torch.storage._dtype_to_storage_type_map()


class _Storage:
    """Stand-in for a storage: its persistent id is all the pickle holds of it."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    def persistent_id(self) -> tuple[Any, ...]:
        name = _STORAGE_TYPES.get(self.dtype)
        if name is not None:
            return ("storage", getattr(torch, name), self.key, "cpu", self.numel)
        # dtypes without a typed storage (float8, uint16...): an untyped storage counted in bytes.
        return ("storage", torch.storage.UntypedStorage, self.key, "cpu", self.numel * self.dtype.itemsize)


class _Tensor:
    """Stand-in for a tensor: reduces exactly as ``torch.Tensor.__reduce_ex__`` does."""

    __slots__ = ("entry", "storage")

    def __init__(self, entry: TensorEntry, storage: _Storage) -> None:
        self.entry, self.storage = entry, storage

    def _tensor(self, requires_grad: bool) -> tuple[Any, tuple[Any, ...]]:
        shape = tuple(self.entry.shape)
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= max(size, 1)
        args = (self.storage, 0, shape, tuple(reversed(stride)), requires_grad, collections.OrderedDict())
        if self.entry.dtype in _STORAGE_TYPES:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.entry.dtype)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if self.entry.is_parameter:
            return (torch._utils._rebuild_parameter,
                    (_Reduced(self._tensor(False)), self.entry.requires_grad, collections.OrderedDict()))
        return self._tensor(self.entry.requires_grad)


class _Reduced:
    __slots__ = ("reduced",)

    def __init__(self, reduced: tuple[Any, ...]) -> None:
        self.reduced = reduced

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return self.reduced


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.persistent_id() if isinstance(obj, _Storage) else None


def _storages(ckpt: Checkpoint) -> tuple[dict[str, _Storage], list[str]]:
    """Each tensor's storage, and the keys whose data is written (one per storage)."""
    out: dict[str, _Storage] = {}
    by_place: dict[tuple[Any, torch.dtype], _Storage] = {}
    written: list[str] = []
    for entry in ckpt.tensors():
        span = entry.byte_span()
        place = (span, entry.dtype) if span is not None and span.nbytes else None
        storage = by_place.get(place) if place is not None else None
        if storage is None:
            storage = _Storage(str(len(written)), entry.dtype, entry.numel)
            written.append(entry.key)
            if place is not None:
                by_place[place] = storage
        out[entry.key] = storage
    return out, written


def _dense(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def load_checked(entry: TensorEntry) -> torch.Tensor:
    """Load an entry, dense and on the CPU, and check it matches what its metadata promised."""
    loaded = entry.load()
    if loaded.device.type == "meta":
        raise UsageError("a meta tensor has a shape but no data", key=entry.key,
                         fix="materialise it before saving, or drop the key")
    t = _dense(loaded)
    if tuple(t.shape) != tuple(entry.shape) or t.dtype != entry.dtype:
        raise CorruptCheckpointError(
            f"loaded as {list(t.shape)} {t.dtype} but described as {list(entry.shape)} {entry.dtype}",
            key=entry.key, fix="the source changed while being converted, or a transform lied; convert again")
    return t


def iter_loaded(ckpt: Checkpoint, keys: Iterator[str] | list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Load tensors one at a time; the caller drops each before asking for the next."""
    for key in keys:
        entry = ckpt[key]
        assert isinstance(entry, TensorEntry)
        yield key, load_checked(entry)


class _Sink:
    """The file torch's zip writer writes through; silent once writing has failed.

    The C++ writer finishes the archive in its destructor when it was not finished, and that
    destructor runs whenever Python drops it, maybe after the file is closed: an exception
    raised there would abort the process. So after a failure its writes go nowhere.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.dead = out, False
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.dead:
            return len(memoryview(data))
        try:
            return self.out.write(data)  # type: ignore[no-any-return]
        except OSError as exc:
            # A full disk must not reach the C++ writer: an exception inside a record leaves its
            # zip state torn, and its destructor then aborts the process. Raised after the archive
            # is finished (into nothing), by write_torch_zip.
            self.error, self.dead = exc, True
            return len(memoryview(data))


def write_torch_zip(ckpt: Checkpoint, out: IO[bytes], *, structure: Any,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ckpt`` as a torch zip to the open binary file ``out``, one tensor at a time."""
    storages, written = _storages(ckpt)
    obj = rebuild(ckpt, structure, lambda e: _Tensor(e, storages[e.key]))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    del obj
    sink = _Sink(out)
    writer = torch._C.PyTorchFileWriter(sink, True, 64)
    try:
        data = buf.getvalue()
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        writer.write_record(".storage_alignment", "64", 2)
        writer.write_record("byteorder", "little", len("little"))
        for key, tensor in iter_loaded(ckpt, written):
            nbytes = tensor.numel() * tensor.element_size()
            # The tensor is little-endian in memory here (readers fix byte order on load).
            writer.write_record(f"data/{storages[key].key}", tensor.untyped_storage(), nbytes)
            del tensor
            if sink.error is not None:
                break
        if metadata:
            text = json.dumps(dict(metadata), sort_keys=True).encode("utf-8")
            writer.write_record(METADATA_RECORD, text, len(text))
        writer.write_end_of_file()
        if sink.error is not None:
            raise sink.error
    except BaseException:
        sink.dead = True
        raise
