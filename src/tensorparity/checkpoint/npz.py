"""``.npz`` archives (numpy.savez): arrays are memory-mapped when stored, never unpickled."""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from tensorparity.checkpoint._mapped import FileRegion, MappedFile
from tensorparity.checkpoint.torch_zip import ZIP_ERRORS, _data_offset, _read_member, check_member
from tensorparity.checkpoint.tree import ByteSpan, Checkpoint, LazyTensor, flatten
from tensorparity.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError

__all__ = ["read_npz"]

_FIX = "the archive is corrupt; save it again with numpy.savez"


def _header(head: bytes, path: Path, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    import io

    f = io.BytesIO(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "created on Python 2": we say what matters ourselves
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as exc:  # noqa: BLE001 - numpy parses hostile text (ast, tokenize): any failure is corruption
        raise CorruptCheckpointError(f"unreadable .npy header ({type(exc).__name__}: {exc})", path=path, key=name,
                                     fix=_FIX) from exc
    if dtype.hasobject:
        raise UnsafeCheckpointError("array of Python objects: reading it would unpickle", path=path,
                                    key=name, fix="save numeric arrays only, or convert to safetensors")
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CorruptCheckpointError(f"unreadable .npy header (shape {shape})", path=path, key=name, fix=_FIX)
    return dtype, tuple(shape), bool(fortran), f.tell()


def _torch_dtype(dtype: np.dtype, path: Path, name: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except (TypeError, ValueError) as exc:
        raise UnknownFormatError(f"array of dtype {dtype} has no torch equivalent", path=path, key=name,
                                 fix="save numeric arrays only (numpy.savez), or convert to safetensors") from exc


def read_npz(path: Path) -> Checkpoint:
    """Open an ``.npz`` file as a :class:`Checkpoint`: one tensor per array."""
    mapped = MappedFile(path)
    tensors: dict[str, LazyTensor] = {}
    try:
        with FileRegion(path) as region, zipfile.ZipFile(region) as zf:
            for info in zf.infolist():
                name = info.filename[: -len(".npy")]
                # No ratio limit: savez_compressed of zeros legitimately shrinks 1000x, and a
                # member may only inflate to exactly the array its header declares (checked below).
                check_member(info, path, info.file_size, max_ratio=None)
                try:
                    with zf.open(info) as member:
                        head = member.read(65536 + 10)
                except ZIP_ERRORS as exc:
                    raise CorruptCheckpointError(f"unreadable zip member ({type(exc).__name__}: {exc})",
                                                 path=path, key=info.filename, fix=_FIX) from exc
                dtype, shape, fortran, hlen = _header(head, path, info.filename)
                nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap-around
                if info.file_size != hlen + nbytes:
                    raise CorruptCheckpointError(
                        f"array needs {nbytes} bytes but the member holds {info.file_size - hlen}",
                        path=path, key=info.filename, fix=_FIX)
                tdtype = _torch_dtype(dtype, path, info.filename)
                if info.compress_type == zipfile.ZIP_STORED:
                    start = _data_offset(region, info, path) + hlen

                    def load(start: int = start, nbytes: int = nbytes, dtype: np.dtype = dtype,
                             shape: tuple[int, ...] = shape, fortran: bool = fortran, key: str = name) -> torch.Tensor:
                        flat = mapped.tensor(start, nbytes, torch.uint8, (nbytes,), key=key)
                        return _to_tensor(flat.numpy().view(dtype), shape, fortran)
                else:
                    def load(info: zipfile.ZipInfo = info, hlen: int = hlen, dtype: np.dtype = dtype,
                             shape: tuple[int, ...] = shape, fortran: bool = fortran, nbytes: int = nbytes) -> torch.Tensor:
                        try:
                            with FileRegion(path) as r, zipfile.ZipFile(r) as z:
                                raw = _read_member(z, info, path, info.file_size, max_ratio=None)
                        except ZIP_ERRORS as exc:
                            raise CorruptCheckpointError(f"unreadable archive ({type(exc).__name__}: {exc})",
                                                         path=path, key=info.filename, fix=_FIX) from exc
                        data = raw[hlen:hlen + nbytes]
                        if len(data) != nbytes:
                            raise CorruptCheckpointError(f"member holds {len(data)} of the array's {nbytes} bytes",
                                                         path=path, key=info.filename, fix=_FIX)
                        return _to_tensor(np.frombuffer(bytearray(data), dtype=dtype), shape, fortran)
                span = None
                if info.compress_type == zipfile.ZIP_STORED and not fortran and dtype.byteorder != ">":
                    span = ByteSpan(str(path), start, nbytes)
                tensors[name] = LazyTensor(shape, tdtype, nbytes, f"{info.filename} in {path}", load,
                                           span=(lambda s=span: s) if span else None)
    except zipfile.BadZipFile as exc:
        raise CorruptCheckpointError(f"not a readable zip archive ({exc})", path=path, fix=_FIX) from exc
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(f"unreadable archive ({type(exc).__name__}: {exc})", path=path, fix=_FIX) from exc
    return Checkpoint(source=str(path), format="npz", entries=flatten(tensors), closers=[mapped.close])


def _to_tensor(flat: np.ndarray, shape: tuple[int, ...], fortran: bool) -> torch.Tensor:
    arr = flat.reshape(shape, order="F" if fortran else "C")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr) if fortran else arr)
