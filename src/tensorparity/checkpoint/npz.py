"""``.npz`` archives (numpy.savez): arrays are memory-mapped when stored, never unpickled."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from tensorparity.checkpoint._mapped import FileRegion, MappedFile
from tensorparity.checkpoint.torch_zip import _data_offset, _read_member, MAX_INFLATED
from tensorparity.checkpoint.tree import Checkpoint, LazyTensor, flatten
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["is_npz", "read_npz"]

_FIX = "the archive is corrupt; save it again with numpy.savez"


def is_npz(path: Path) -> bool:
    """Whether a zip file is an npz: every member is an ``.npy`` array."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _header(head: bytes, path: Path, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    import io

    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise CorruptCheckpointError(f"unreadable .npy header ({exc})", path=path, key=name, fix=_FIX) from exc
    if dtype.hasobject:
        raise UnsafeCheckpointError("array of Python objects: reading it would unpickle", path=path,
                                    key=name, fix="save numeric arrays only, or convert to safetensors")
    return dtype, tuple(shape), bool(fortran), f.tell()


def read_npz(path: Path) -> Checkpoint:
    """Open an ``.npz`` file as a :class:`Checkpoint`: one tensor per array."""
    mapped = MappedFile(path)
    tensors: dict[str, LazyTensor] = {}
    try:
        with FileRegion(path) as region, zipfile.ZipFile(region) as zf:
            for info in zf.infolist():
                name = info.filename[: -len(".npy")]
                with zf.open(info) as member:
                    head = member.read(65536 + 10)
                dtype, shape, fortran, hlen = _header(head, path, info.filename)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size < hlen + nbytes:
                    raise CorruptCheckpointError(
                        f"array needs {nbytes} bytes but the member holds {info.file_size - hlen}",
                        path=path, key=info.filename, fix=_FIX)
                tdtype = torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
                if info.compress_type == zipfile.ZIP_STORED:
                    start = _data_offset(region, info, path) + hlen

                    def load(start: int = start, nbytes: int = nbytes, dtype: np.dtype = dtype,
                             shape: tuple[int, ...] = shape, fortran: bool = fortran, key: str = name) -> torch.Tensor:
                        flat = mapped.tensor(start, nbytes, torch.uint8, (nbytes,), key=key)
                        return _to_tensor(flat.numpy().view(dtype), shape, fortran)
                else:
                    def load(info: zipfile.ZipInfo = info, hlen: int = hlen, dtype: np.dtype = dtype,
                             shape: tuple[int, ...] = shape, fortran: bool = fortran) -> torch.Tensor:
                        with FileRegion(path) as r, zipfile.ZipFile(r) as z:
                            raw = _read_member(z, info, path, MAX_INFLATED)
                        return _to_tensor(np.frombuffer(bytearray(raw[hlen:]), dtype=dtype), shape, fortran)
                tensors[name] = LazyTensor(shape, tdtype, nbytes, f"{info.filename} in {path}", load)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(f"not a readable zip archive ({exc})", path=path, fix=_FIX) from exc
    return Checkpoint(source=str(path), format="npz", entries=flatten(tensors), closers=[mapped.close])


def _to_tensor(flat: np.ndarray, shape: tuple[int, ...], fortran: bool) -> torch.Tensor:
    arr = flat.reshape(shape, order="F" if fortran else "C")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr) if fortran else arr)
