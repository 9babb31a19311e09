"""torch.save zip archives (``.pt .pth .bin .ckpt``): read inertly, tensors memory-mapped, and
written streaming.

A torch zip holds ``<record>/data.pkl`` (the pickled structure, tensors as persistent ids),
``<record>/data/<key>`` (one stored member per storage, 64-byte aligned), ``byteorder`` and
``version``. The pickle goes through the inert unpickler; each storage is located by its member's
local header, and a tensor is a strided view of the mapped file. The archive may sit at an offset
inside another file (a ``.nemo`` tar, a ``.distcp`` file).

Writing: ``torch.save`` pickles the whole object with every tensor in memory, then writes the storages.
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
whose keys hold dots) comes from the reader's ``Checkpoint.structure``; see :mod:`._rebuild`.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tensorparity._dtypes import dtype_info, to_torch
from tensorparity.checkpoint._mapped import FileRegion, MappedFile, check_extent
from tensorparity.checkpoint._plain import to_plain
from tensorparity.checkpoint.layout import build_checkpoint
from tensorparity.checkpoint.safe_pickle import (
    Placeholder,
    StorageRef,
    TensorRef,
    _StorageType,
    completed,
    inert_loads,
)
from tensorparity.checkpoint.tree import ByteSpan, Checkpoint, LazyTensor, TensorEntry
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnsafeCheckpointError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["METADATA_RECORD", "is_torch_zip", "iter_loaded", "load_checked", "read_metadata", "read_object",
           "read_torch_zip", "write_torch_zip"]

ZIP_MAGIC = b"PK\x03\x04"
MAX_RATIO = 200  # compressed members above this expansion are refused as zip bombs
MAX_INFLATED = 1 << 30
_ZIP_FIX = "the file is truncated or corrupt; copy or save it again"

# What zipfile raises on damaged bytes besides BadZipFile: an unknown compression method or
# version (NotImplementedError), an encrypted member (RuntimeError), a broken deflate stream
# (zlib.error), a short member (EOFError), a non-UTF-8 name flagged as UTF-8 (ValueError).
ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError,
    EOFError, OSError, ValueError, struct.error,
)


def is_torch_zip(names: list[str]) -> bool:
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)


def _data_offset(region: FileRegion, info: zipfile.ZipInfo, path: Path | str) -> int:
    """Offset of a member's bytes from the start of the archive, read from its local header."""
    header = region.pread(30, info.header_offset)
    if len(header) != 30 or header[:4] != ZIP_MAGIC:
        raise CorruptCheckpointError("zip member has no local header", path=path, key=info.filename,
                                     fix="the archive is corrupt; save it again")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > region.length:
        raise CorruptCheckpointError("zip member runs past the end of the file", path=path,
                                     key=info.filename, fix="the file is truncated; copy it again")
    return start


def check_member(info: zipfile.ZipInfo, path: Path | str, cap: int, *, max_ratio: int | None = MAX_RATIO) -> None:
    """Refuse a member before reading it: a bomb, encrypted, or sizes that contradict each other.

    ``max_ratio=None`` is for formats that compress legitimately (``savez_compressed`` of zeros),
    where the member's declared size is already checked against what it must hold.
    """
    if info.file_size > cap:
        raise UnsafeCheckpointError(f"member inflates to {info.file_size} bytes (limit {cap})",
                                    path=path, key=info.filename, fix="refusing a possible zip bomb")
    if (max_ratio is not None and info.compress_type != zipfile.ZIP_STORED
            and info.file_size > max_ratio * max(1, info.compress_size)):
        raise UnsafeCheckpointError(f"member expands more than {max_ratio}x", path=path, key=info.filename,
                                    fix="refusing a possible zip bomb; re-save with torch.save")
    if info.flag_bits & 0x1:
        raise CorruptCheckpointError("member is encrypted", path=path, key=info.filename,
                                     fix="re-save the checkpoint without encryption")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        # Stored members are mapped in place: the bytes read must be the member's own.
        raise CorruptCheckpointError(
            f"stored member claims {info.file_size} bytes but occupies {info.compress_size}",
            path=path, key=info.filename, fix=_ZIP_FIX)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path | str, cap: int, *,
                 max_ratio: int | None = MAX_RATIO) -> bytes:
    check_member(info, path, cap, max_ratio=max_ratio)
    try:
        with zf.open(info) as f:
            data = f.read(cap + 1)
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(f"unreadable zip member ({type(exc).__name__}: {exc})", path=path,
                                     key=info.filename, fix=_ZIP_FIX) from exc
    if len(data) > cap:
        raise UnsafeCheckpointError("member inflates past its declared size", path=path,
                                    key=info.filename, fix="refusing a possible zip bomb")
    return data


def read_object(path: Path, *, offset: int = 0, length: int | None = None,
                display: str | None = None) -> tuple[Any, dict[str, Any], list[Any]]:
    """Read the inert structure of a torch zip, tensors as :class:`LazyTensor`.

    Returns:
        ``(obj, info, closers)``: the structure, archive facts (``record``, ``byteorder``,
        ``version``), and callables that release the mapping.
    """
    shown = display or str(path)
    region = FileRegion(path, offset, length)
    try:
        return _read(region, path, shown)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(f"not a readable zip archive ({exc})", path=shown, fix=_ZIP_FIX) from exc
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(f"unreadable archive ({type(exc).__name__}: {exc})", path=shown,
                                     fix=_ZIP_FIX) from exc
    finally:
        region.close()


def _read(region: FileRegion, path: Path, shown: str) -> tuple[Any, dict[str, Any], list[Any]]:
    with zipfile.ZipFile(region) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        names = list(infos)
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise UnsafeCheckpointError(
                "TorchScript archive: it holds code, which tensorparity never runs", path=shown,
                fix="save the model's state_dict with torch.save and open that instead")
        if pkl is None:
            raise CorruptCheckpointError("zip archive without data.pkl: not a torch.save file",
                                         path=shown, fix="open a file written by torch.save")
        record = pkl[: -len("data.pkl")]
        byteorder = "little"
        if record + "byteorder" in infos:
            byteorder = _read_member(zf, infos[record + "byteorder"], shown, 16).decode("ascii", "replace")
        version = None
        if record + "version" in infos:
            version = _read_member(zf, infos[record + "version"], shown, 64).decode("ascii", "replace").strip()

        storages: dict[str, StorageRef] = {}

        def persistent_load(pid: Any) -> StorageRef:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
                raise CorruptCheckpointError(f"unexpected persistent id {str(pid)[:60]}")
            _, stype, key, location, numel = pid[:5]
            if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
                raise CorruptCheckpointError(f"malformed storage reference {str(pid)[:60]}")
            ref = storages.get(key)
            if ref is None:
                ref = storages[key] = StorageRef(key, stype.dtype, numel, str(location))
            return ref

        raw_pickle = _read_member(zf, infos[pkl], shown, 1 << 30)
        try:
            obj = inert_loads(raw_pickle, persistent_load=persistent_load)
        except TensorParityError as exc:  # the unpickler knows neither the file nor the member
            raise completed(exc, path=shown, key=pkl) from exc

        mapped = MappedFile(path)
        placed: dict[str, tuple[int, zipfile.ZipInfo]] = {}
        for key, ref in storages.items():
            name = f"{record}data/{key}"
            info = infos.get(name)
            if info is None:
                raise CorruptCheckpointError("storage named by the pickle is missing from the archive",
                                             path=shown, key=name, fix="the file is corrupt; save it again")
            if info.file_size < ref.nbytes:
                raise CorruptCheckpointError(
                    f"storage declares {ref.nbytes} bytes but the archive holds {info.file_size}",
                    path=shown, key=name, fix="the file is corrupt or was truncated; save it again")
            check_member(info, shown, MAX_INFLATED)
            placed[key] = (_data_offset(region, info, shown), info)
        start = region.start

        def locate(ref: TensorRef, where: str) -> LazyTensor:
            return _lazy(ref, where, shown, mapped, zf_path=path, start=start, placed=placed,
                         byteorder=byteorder, region_length=region.length)

        try:
            obj = bind_tensors(obj, locate, shown)
        except TensorParityError as exc:
            raise completed(exc, path=shown, key=pkl) from exc
    return obj, {"record": record.rstrip("/"), "byteorder": byteorder, "version": version}, [mapped.close]


def describe_ref(ref: TensorRef, where: str, shown: str) -> tuple[int, int, str | None, LazyTensor | None]:
    """What every torch reader needs of a tensor reference: ``(numel, nbytes, note, meta)``.

    ``meta`` is a ready entry for a meta tensor (shape only, no storage); otherwise the tensor's
    extent has been checked against its storage.
    """
    numel = 1
    for size in ref.shape:
        numel *= size
    nbytes = numel * dtype_info(ref.dtype).itemsize
    if ref.storage is None:
        def nothing() -> torch.Tensor:
            import torch

            return torch.empty(ref.shape, dtype=to_torch(ref.dtype), device="meta")
        meta = LazyTensor(ref.shape, ref.dtype, nbytes, "meta (no data)", nothing, ref.requires_grad,
                          ref.is_parameter, ref.note)
        return numel, nbytes, ref.note, meta
    check_extent(ref.shape, ref.stride, ref.offset, ref.storage.numel, path=shown, key=where)
    note = ref.note or (f"tensor subclass {ref.subclass}" if ref.subclass else None)
    if ref.storage.location not in ("cpu", ""):
        note = f"saved on {ref.storage.location}" + (f"; {note}" if note else "")
    return numel, nbytes, note, None


def _lazy(ref: TensorRef, where: str, shown: str, mapped: MappedFile, *, zf_path: Path, start: int,
          placed: dict[str, tuple[int, zipfile.ZipInfo]], byteorder: str, region_length: int) -> LazyTensor:
    numel, nbytes, note, meta = describe_ref(ref, where, shown)
    if meta is not None:
        return meta
    storage = ref.storage
    assert storage is not None
    data_start, info = placed[storage.key]
    member = f"{shown}::{info.filename}" if shown != str(zf_path) else info.filename
    location = f"{member} @ {start + data_start}"

    if info.compress_type == zipfile.ZIP_STORED:
        def load() -> torch.Tensor:
            t = mapped.tensor(start + data_start, storage.nbytes, storage.dtype, ref.shape, ref.stride,
                              ref.offset, key=where)
            return _fix_order(t, byteorder)
    else:
        def load() -> torch.Tensor:
            import torch

            try:
                with FileRegion(zf_path, start, region_length) as region, zipfile.ZipFile(region) as zf:
                    raw = _read_member(zf, info, shown, MAX_INFLATED)
            except ZIP_ERRORS as exc:
                raise CorruptCheckpointError(f"unreadable archive ({type(exc).__name__}: {exc})", path=shown,
                                             key=info.filename, fix=_ZIP_FIX) from exc
            if len(raw) < storage.nbytes:
                raise CorruptCheckpointError(f"member holds {len(raw)} bytes, not the {storage.nbytes} declared",
                                             path=shown, key=info.filename, fix=_ZIP_FIX)
            dtype = to_torch(storage.dtype)
            flat = torch.frombuffer(bytearray(raw[: storage.nbytes]), dtype=torch.uint8).view(dtype) \
                if storage.nbytes else torch.empty(0, dtype=dtype)
            return _fix_order(torch.as_strided(flat, ref.shape, ref.stride, ref.offset), byteorder)
    span: Callable[[], ByteSpan] | None = None
    if info.compress_type == zipfile.ZIP_STORED and byteorder != "big" and _is_dense(ref.shape, ref.stride):
        where_bytes = ByteSpan(str(zf_path), start + data_start + ref.offset * dtype_info(ref.dtype).itemsize, nbytes)
        span = lambda: where_bytes  # noqa: E731
    return LazyTensor(ref.shape, ref.dtype, nbytes, location, load, ref.requires_grad, ref.is_parameter, note, span)


def _is_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether shape/stride describe a C-contiguous block (size-1 dims may have any stride)."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _fix_order(t: torch.Tensor, byteorder: str) -> torch.Tensor:
    if byteorder != "big" or t.element_size() == 1:
        return t
    import torch

    # Swap bytes of each element: view as bytes, reverse the last axis, view back.
    b = t.contiguous().view(torch.uint8).view(-1, t.element_size()).flip(-1).contiguous()
    return b.view(t.dtype).view(t.shape)


def bind_tensors(obj: Any, locate: Callable[[TensorRef, str], LazyTensor], shown: str) -> Any:
    """Turn known types into plain data and every :class:`TensorRef` into a located tensor.

    ``to_plain`` caps nesting at 200 levels, so the recursion below is bounded.
    """
    return _bind(to_plain(obj), locate, "")


def _bind(value: Any, locate: Callable[[TensorRef, str], LazyTensor], where: str) -> Any:
    if isinstance(value, TensorRef):
        return locate(value, where)
    if isinstance(value, dict):
        return {k: _bind(v, locate, _join(where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind(v, locate, _join(where, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_bind(v, locate, _join(where, i)) for i, v in enumerate(value))
    if isinstance(value, Placeholder):
        value.args = tuple(_bind(a, locate, _join(where, f"args.{i}")) for i, a in enumerate(value.args))
        value.state = _bind(value.state, locate, _join(where, "state"))
        value.items = {k: _bind(v, locate, _join(where, f"items.{k}")) for k, v in value.items.items()}
        value.listitems = [_bind(v, locate, _join(where, f"listitems.{i}")) for i, v in enumerate(value.listitems)]
    return value


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def read_torch_zip(path: Path, *, offset: int = 0, length: int | None = None,
                   display: str | None = None) -> Checkpoint:
    """Open a torch.save zip archive as a :class:`Checkpoint` (Lightning sections recognised)."""
    shown = display or str(path)
    try:
        obj, info, closers = read_object(path, offset=offset, length=length, display=shown)
    except TensorParityError as exc:
        raise exc.with_path(shown) from exc.__cause__
    provenance = {"torch_zip_version": info["version"], "record": info["record"]}
    if info["byteorder"] == "big":
        provenance["byteorder"] = "big"
    return build_checkpoint(obj, source=shown, base_format="torch-zip", provenance=provenance, closers=closers)


# ---------------------------------------------------------------------------------------------
# Writing

METADATA_RECORD = ".data/tensorparity_metadata.json"  # inside the archive folder; torch.load ignores it


@functools.cache
def _storage_types() -> dict[Any, str]:
    import torch

    return torch.storage._dtype_to_storage_type_map()


class _Storage:
    """Stand-in for a storage: its persistent id is all the pickle holds of it."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    def persistent_id(self) -> tuple[Any, ...]:
        import torch

        name = _storage_types().get(self.dtype)
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
        import torch

        shape = tuple(self.entry.shape)
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= max(size, 1)
        args = (self.storage, 0, shape, tuple(reversed(stride)), requires_grad, collections.OrderedDict())
        if self.entry.dtype in _storage_types():
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.entry.dtype)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        import torch

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
    import torch

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
    import torch

    from tensorparity.checkpoint._rebuild import rebuild  # lazy: torch loads only when a file is written

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


def read_metadata(path: Path) -> dict[str, str]:
    """The strings :func:`write_torch_zip` recorded in a torch zip (empty when none)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/" + METADATA_RECORD)), None)
            if name is None or zf.getinfo(name).file_size > 16 << 20:
                return {}
            data = json.loads(zf.read(name))
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
