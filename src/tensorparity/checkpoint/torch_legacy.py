"""Legacy torch.save files (torch < 1.6, or ``_use_new_zipfile_serialization=False``).

The file is consecutive pickles, then raw storage bytes::

    pickle  MAGIC_NUMBER (0x1950a86a20f9469cfc6c)
    pickle  PROTOCOL_VERSION (1001)
    pickle  sys_info {"protocol_version", "little_endian", "type_sizes"}
    pickle  the object; storages are persistent ids
            ("storage", storage_type, root_key, location, numel, view_metadata)
    pickle  the sorted list of root storage keys
    then, for each key in that order: int64 element count (little-endian), raw bytes

Every pickle goes through the inert unpickler. Storages are located (count checked against the
pickle, bytes checked present) but not read; a tensor reads only its own span with seek + read.
The same reader serves a legacy file sitting at an offset inside another file (a ``.nemo`` tar).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch

from tensorparity._dtypes import dtype_info, to_torch
from tensorparity.checkpoint._mapped import FileRegion
from tensorparity.checkpoint.layout import build_checkpoint
from tensorparity.checkpoint.safe_pickle import StorageRef, TensorRef, _StorageType, inert_load_file
from tensorparity.checkpoint.torch_zip import _fix_order, bind_tensors, describe_ref
from tensorparity.checkpoint.tree import Checkpoint, LazyTensor
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnknownFormatError

__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "is_legacy", "read_legacy", "read_legacy_object"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_FIX = "the file is truncated or corrupt; copy it again or re-save it with torch.save"
_RESAVE = "load it with the torch version that wrote it and re-save it with a recent torch.save"


def is_legacy(head: bytes) -> bool:
    """Whether bytes start like a legacy torch.save file: a pickled long (the magic number).

    Example:
        >>> is_legacy(b"\\x80\\x02\\x8a\\x0a" + bytes(10))
        True
    """
    return len(head) >= 4 and head[:1] == b"\x80" and head[2:4] == b"\x8a\x0a"


def read_legacy(path: Path) -> Checkpoint:
    """Open a legacy (pre-1.6) torch.save file as a :class:`Checkpoint`.

    Args:
        path: the file.

    Raises:
        CorruptCheckpointError: a pickle is malformed, or a storage is short or missing.
        UnknownFormatError: a pickle, but not one written by torch.save.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "old.pt"
        >>> torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
        >>> read_legacy(p)["w"].load()
        tensor([1., 1.])
    """
    shown = str(path)
    obj, info = read_legacy_object(path, display=shown)
    provenance: dict[str, Any] = {"torch_legacy_protocol": info["protocol_version"]}
    notes = []
    if not info["little_endian"]:
        notes.append("saved on a big-endian machine; its bytes are read as little-endian, as torch does")
    return build_checkpoint(obj, source=shown, base_format="torch-legacy", provenance=provenance, notes=notes)


def read_legacy_object(path: Path, *, offset: int = 0, length: int | None = None,
                       display: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the inert structure of a legacy torch.save file, tensors as :class:`LazyTensor`.

    Args:
        path: the file holding it.
        offset: where the legacy file starts inside ``path``.
        length: its length (default: to the end of ``path``).
        display: how to name it in errors and locations (e.g. ``"a.nemo::./model_weights.ckpt"``).

    Returns:
        ``(obj, info)``: the structure and ``{"protocol_version", "little_endian", "sys_info"}``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "old.pt"
        >>> torch.save([torch.zeros(3)], p, _use_new_zipfile_serialization=False)
        >>> read_legacy_object(p)[0][0].shape
        (3,)
    """
    shown = display or str(path)
    try:
        with FileRegion(path, offset, length) as region:
            return _read(region, path, shown)
    except TensorParityError as exc:
        raise exc.with_path(shown)
    except (OSError, EOFError, ValueError, OverflowError) as exc:
        raise CorruptCheckpointError(f"unreadable legacy torch file ({type(exc).__name__}: {exc})", path=shown,
                                     fix=_FIX) from exc


def _load(f: io.BufferedReader, shown: str, what: str, persistent_load: Any = None) -> Any:
    try:
        return inert_load_file(f, persistent_load=persistent_load)
    except CorruptCheckpointError as exc:
        # The inert unpickler knows what is wrong, not which of the five pickles it was, nor that
        # the likeliest cause in a legacy file is truncation.
        raise CorruptCheckpointError(exc.message, path=shown, key=exc.key or what, fix=_FIX) from exc


def _read(region: FileRegion, path: Path, shown: str) -> tuple[Any, dict[str, Any]]:
    f = io.BufferedReader(region, 1 << 16)
    magic = _load(f, shown, "magic number")
    if magic != MAGIC_NUMBER or isinstance(magic, bool):
        raise UnknownFormatError("a pickle, but not a torch.save file (wrong magic number)", path=shown,
                                 key="magic number", fix="open a file written by torch.save")
    protocol = _load(f, shown, "protocol version")
    if protocol != PROTOCOL_VERSION:
        raise UnknownFormatError(f"legacy torch.save protocol {protocol!r} is not {PROTOCOL_VERSION}",
                                 path=shown, key="protocol version", fix=_RESAVE)
    sys_info = _load(f, shown, "sys_info")
    little = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)

    roots: dict[str, StorageRef] = {}
    views: dict[str, tuple[str, int]] = {}  # view key -> (root key, element offset)
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CorruptCheckpointError(f"unexpected persistent id {str(pid)[:60]}")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2:
            return pid[1]  # a pickled nn.Module's class (with its source text): the class placeholder
        if kind != "storage" or len(pid) != 6:
            raise CorruptCheckpointError(f"unexpected persistent id {str(pid)[:60]}")
        _, stype, key, location, numel, view = pid
        if (not isinstance(stype, _StorageType) or not isinstance(key, str) or isinstance(numel, bool)
                or not isinstance(numel, int) or numel < 0):
            raise CorruptCheckpointError(f"malformed storage reference {str(pid)[:60]}")
        loc = location.decode("ascii", "replace") if isinstance(location, bytes) else str(location)
        root = roots.get(key)
        if root is None:
            root = roots[key] = StorageRef(key, stype.dtype, numel, loc)
        if view is None:
            return root
        # Torch before 1.0 could save a view of a storage: (view key, element offset, numel).
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in view[1:])):
            raise CorruptCheckpointError(f"malformed storage view {str(view)[:60]}")
        view_key, view_offset, view_numel = view
        if view_offset + view_numel > root.numel:
            raise CorruptCheckpointError(f"storage view [{view_offset}, {view_offset + view_numel}) lies "
                                         f"outside its {root.numel}-element storage {key}")
        ref = storages.get(view_key)
        if ref is None:
            ref = storages[view_key] = StorageRef(view_key, root.dtype, view_numel, loc)
            views[view_key] = (key, view_offset)
        return ref

    obj = _load(f, shown, "data pickle", persistent_load)
    keys = _load(f, shown, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptCheckpointError("the storage key list is not a list of strings", path=shown,
                                     key="storage key list", fix=_FIX)
    missing = sorted(set(roots) - set(keys))
    if missing:
        raise CorruptCheckpointError("storage named by the pickle has no data in the file", path=shown,
                                     key=f"storage {missing[0]}", fix=_FIX)

    # Walk the storage records: count, then bytes; nothing but the counts is read.
    starts: dict[str, int] = {}
    pos = f.tell()
    for key in keys:
        root = roots.get(key)
        if root is None:
            raise CorruptCheckpointError("storage key listed but never used by the pickle, so its size is "
                                         "unknown", path=shown, key=f"storage {key}", fix=_FIX)
        region.seek(pos)
        raw = region.read(8)
        if len(raw) != 8:
            raise CorruptCheckpointError(f"file ends at byte {pos + len(raw)}, inside the element count",
                                         path=shown, key=f"storage {key}", fix=_FIX)
        count = int.from_bytes(raw, "little", signed=True)
        if count != root.numel:
            raise CorruptCheckpointError(f"storage holds {count} elements but the pickle says {root.numel}",
                                         path=shown, key=f"storage {key}", fix=_FIX)
        end = pos + 8 + root.nbytes
        if end > region.length:
            raise CorruptCheckpointError(
                f"storage needs bytes [{pos + 8}, {end}) but the file has {region.length}",
                path=shown, key=f"storage {key}", fix=_FIX)
        starts[key] = pos + 8
        pos = end

    for key, (root_key, element_offset) in views.items():
        starts[key] = starts[root_key] + element_offset * dtype_info(roots[root_key].dtype).itemsize
    storages.update(roots)
    base = region.start

    def locate(ref: TensorRef, where: str) -> LazyTensor:
        return _lazy(ref, where, path, shown, base + starts[ref.storage.key] if ref.storage else 0)

    bound = bind_tensors(obj, locate, shown)
    return bound, {"protocol_version": protocol, "little_endian": little, "sys_info": sys_info}


def _lazy(ref: TensorRef, where: str, path: Path, shown: str, start: int) -> LazyTensor:
    numel, nbytes, note, meta = describe_ref(ref, where, shown)
    if meta is not None:
        return meta
    storage = ref.storage
    assert storage is not None
    itemsize = dtype_info(storage.dtype).itemsize
    dtype = to_torch(storage.dtype)
    # Only the span this tensor covers is read: a slice of a large storage reads its slice.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if numel else ref.offset - 1
    span_start, span_bytes = start + ref.offset * itemsize, (last + 1 - ref.offset) * itemsize

    def load() -> torch.Tensor:
        if numel == 0:
            return torch.empty(ref.shape, dtype=dtype)
        with open(path, "rb") as fh:
            fh.seek(span_start)
            raw = bytearray(fh.read(span_bytes))
        if len(raw) != span_bytes:
            raise CorruptCheckpointError(f"file ends inside the tensor's {span_bytes} bytes at {span_start}",
                                         path=shown, key=where, fix="the file was truncated after opening; copy it again")
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
        tensor = torch.as_strided(flat, ref.shape, ref.stride, 0)
        # Storage bytes are little-endian whatever machine wrote them (torch swaps on write).
        return _fix_order(tensor, "big") if sys.byteorder == "big" else tensor

    location = f"{shown} storage {storage.key} @ {start}"
    return LazyTensor(ref.shape, ref.dtype, nbytes, location, load, ref.requires_grad, ref.is_parameter, note)
