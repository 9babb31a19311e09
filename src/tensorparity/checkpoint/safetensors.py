"""safetensors files, read and written: the header is validated here, tensors are read by the
safetensors library and written here, streaming.

Layout: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data. Validation checks
everything the header claims against the file before any tensor is touched, so a lying header
gets a message naming the tensor, not a crash.

Writing: The safetensors library cannot stream: ``save_file`` takes a dict of every tensor, in memory,
at once. But a safetensors header (JSON: dtype, shape and byte offsets of each tensor) depends
on shapes and dtypes alone, so it is computed from metadata, written first, and the tensors'
bytes follow one by one. Tensors are laid out as the library lays them out (by dtype, widest
first, then by name; header padded with spaces to 8 bytes), so for the same tensors and
metadata the file is byte-for-byte what ``save_file`` writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tensorparity._dtypes import dtype_info, dtype_name
from tensorparity.checkpoint._mapped import MappedFile
from tensorparity.checkpoint.tree import ByteSpan, Checkpoint, LazyTensor, TensorEntry, flatten
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "layout", "read_header", "read_safetensors", "safetensors_tensors", "write_entries",
           "write_file", "write_tensors"]

MAX_HEADER = 100_000_000  # the safetensors library's own limit

# safetensors' dtype codes and torch's names for them.
DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

_FIX = "the file is corrupt or truncated; save it again with safetensors"
_INT = {int}


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Read and validate a safetensors header.

    Returns:
        ``(tensors, metadata, data_start)``: per tensor ``{dtype, shape, start, end}`` with
        absolute byte offsets, ``__metadata__``, and where the data section begins.

    Raises:
        CorruptCheckpointError: the header is malformed or contradicts the file.
        UnsafeCheckpointError: the header is larger than 100 MB.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError("shorter than a safetensors header", path=path, fix=_FIX)
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise UnsafeCheckpointError(f"header claims {n} bytes (limit {MAX_HEADER})", path=path, fix=_FIX)
        if 8 + n > size:
            raise CorruptCheckpointError(f"header claims {n} bytes but the file has {size - 8}", path=path, fix=_FIX)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if b"\\u" in raw:  # an escaped lone surrogate parses here but not in the safetensors library
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        raise CorruptCheckpointError(f"header is not valid JSON ({type(exc).__name__}: {exc})", path=path,
                                     fix=_FIX) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError("header is not a JSON object", path=path, fix=_FIX)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError("__metadata__ must map strings to strings", path=path, fix=_FIX)
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CorruptCheckpointError("tensor description is not an object", path=path, key=name, fix=_FIX)
        code = info.get("dtype")
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise CorruptCheckpointError(f"unknown dtype {info.get('dtype')!r}", path=path, key=name,
                                         fix="upgrade tensorparity, or re-save with a supported dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        # Exact types (a bool is an int, not a size); a set of types, not a generator per entry:
        # a trace's shard header holds thousands of entries, read on every open.
        if not (type(shape) is list and set(map(type, shape)) <= _INT and min(shape, default=0) >= 0):
            raise CorruptCheckpointError(f"shape {shape!r} is not a list of sizes", path=path, key=name, fix=_FIX)
        if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int):
            raise CorruptCheckpointError(f"data_offsets {offsets!r} are not two integers", path=path, key=name, fix=_FIX)
        begin, end = offsets
        expected = math.prod(shape) * dtype_info(dtype).itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise CorruptCheckpointError(
                f"data_offsets {offsets} hold {end - begin} bytes but shape {shape} of {info['dtype']} needs {expected}",
                path=path, key=name, fix=_FIX)
        if end > data_len:
            raise CorruptCheckpointError(
                f"data_offsets end at {end} but the data section has {data_len} bytes",
                path=path, key=name, fix="the file is truncated; copy or download it again")
        tensors[name] = {"dtype": dtype, "shape": tuple(shape), "start": data_start + begin, "end": data_start + end}
        spans.append((begin, end, name))
    # The safetensors library demands what it writes: tensors tile the data section exactly,
    # with no overlap, no gap and nothing after the last one. Checked here, named by tensor.
    spans.sort()
    covered, last = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise CorruptCheckpointError(f"bytes of {last!r} and {name!r} overlap", path=path, key=name, fix=_FIX)
        if begin > covered:
            raise CorruptCheckpointError(f"{begin - covered} unclaimed bytes before this tensor's data",
                                         path=path, key=name, fix=_FIX)
        covered, last = end, name
    if covered != data_len:
        raise CorruptCheckpointError(f"{data_len - covered} bytes after the last tensor's data", path=path,
                                     key=last, fix=_FIX)
    return tensors, metadata, data_start


class _Handle:
    """One lazily opened ``safe_open`` handle per file, shared by its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def get(self, name: str) -> torch.Tensor:
        try:
            if self._handle is None:
                from safetensors import safe_open

                self._handle = safe_open(str(self.path), framework="pt")
            return self._handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - the library's own errors, reworded
            raise CorruptCheckpointError(f"safetensors could not read the tensor ({exc})", path=self.path,
                                         key=name, fix=_FIX) from exc

    def close(self) -> None:
        self._handle = None


def safetensors_tensors(path: Path, *, display: str | None = None,
                        mapped: bool = False) -> tuple[dict[str, LazyTensor], dict[str, str], Any]:
    """The tensors of one safetensors file, located but not read, and the handle to close.

    ``mapped``: map the file once (a :class:`~tensorparity.checkpoint._mapped.MappedFile`) and
    load every tensor as a copy-on-write view of it, its byte span carrying the mapping, instead
    of the library copying each tensor out (a trace's shards, whose every tensor a compare reads).
    The header was validated in full first, so every view lies inside the file.
    """
    tensors, metadata, _ = read_header(path)
    shown = display or str(path)
    out: dict[str, LazyTensor] = {}
    if mapped:
        handle: Any = MappedFile(path)
        for name, info in tensors.items():
            span = ByteSpan(str(path), info["start"], info["end"] - info["start"], handle)
            out[name] = LazyTensor(info["shape"], info["dtype"], span.nbytes, f"{shown} @ {info['start']}",
                                   lambda s=span, i=info, n=name: handle.tensor(s.offset, s.nbytes, i["dtype"],
                                                                                tuple(i["shape"]), key=n),
                                   span=lambda s=span: s)
        return out, metadata, handle
    handle = _Handle(path)
    for name, info in tensors.items():
        span = ByteSpan(str(path), info["start"], info["end"] - info["start"])
        out[name] = LazyTensor(info["shape"], info["dtype"], span.nbytes, f"{shown} @ {info['start']}",
                               lambda n=name: handle.get(n), span=lambda s=span: s)
    return out, metadata, handle


def read_safetensors(path: Path) -> Checkpoint:
    """Open one safetensors file as a :class:`Checkpoint`; ``__metadata__`` becomes provenance."""
    tensors, metadata, handle = safetensors_tensors(path)
    entries = flatten(tensors)
    provenance: dict[str, Any] = {}
    if metadata:
        provenance["metadata"] = dict(metadata)
        if "format" in metadata:
            provenance["framework"] = metadata["format"]
    return Checkpoint(source=str(path), format="safetensors", entries=entries, provenance=provenance,
                      closers=[handle.close])


# ---------------------------------------------------------------------------------------------
# Writing

# The library's dtype codes, widest first, in the order it sorts them (its Dtype enum, descending).
_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0",
          "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "I8", "U8", "BOOL")
# What each dtype is written as: every code read (DTYPES), and the float8 codes the library writes
# that this reader does not claim to read.
_CODES = {name: code for code, name in DTYPES.items()} | {
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0"}


class _Spec(NamedTuple):
    """What the header needs of a tensor held in memory (a :class:`TensorEntry` has the same)."""

    key: str
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int


def _code(entry: TensorEntry | _Spec, dest: Path) -> str:
    code = _CODES.get(entry.dtype_name)
    if code is None:
        raise UsageError(f"safetensors has no dtype for {entry.dtype_name}", path=dest,
                         key=entry.key, fix="cast the tensor in a mapping, or write torch or dcp")
    return code


def layout(entries: Sequence[Any], metadata: Mapping[str, str] | None, dest: Path) -> tuple[bytes, list[Any]]:
    """The header bytes (length prefix included) and the order the tensors' bytes follow in.

    ``entries``: :class:`TensorEntry` objects, or anything with their ``key``, ``dtype_name``,
    ``shape`` and ``nbytes``.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> head, order = layout(list(tp_open({"b": torch.ones(1, dtype=torch.int8), "a": torch.ones(2)}).tensors()),
        ...                      None, Path("x.safetensors"))
        >>> [e.key for e in order], head[8:].decode().rstrip()
        (['a', 'b'], '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[1],"data_offsets":[8,9]}}')
    """
    codes = {e.key: _code(e, dest) for e in entries}
    order = sorted(entries, key=lambda e: (_ORDER.index(codes[e.key]), e.key))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in order:
        header[e.key] = {"dtype": codes[e.key], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _write(dest: Path, entries: Sequence[Any], metadata: Mapping[str, str] | None,
           data: Callable[[Any], torch.Tensor], hasher: Any) -> int:
    """Write the header, then each tensor's bytes in the header's order; return the file's size."""
    import torch

    head, order = layout(entries, metadata, dest)
    update = hasher.update if hasher is not None else None
    with open(dest, "wb") as out:
        out.write(head)
        if update is not None:
            update(head)
        for entry in order:
            tensor = data(entry)
            if tensor.numel():
                # A uint8 view of the dense tensor: no copy, and numpy hands the buffer to write().
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                out.write(raw)
                if update is not None:
                    update(raw)
                del raw
            del tensor
    return len(head) + sum(e.nbytes for e in order)


def write_entries(entries: list[TensorEntry], dest: Path, metadata: Mapping[str, str] | None) -> None:
    """Write these entries' tensors, loaded one at a time, into one safetensors file: byte for byte
    what ``save_file`` writes (which orders several metadata entries at random)."""
    from tensorparity.checkpoint.torch_zip import load_checked  # lazy: torch loads only when a file is written

    _write(dest, entries, metadata, load_checked, None)


def write_tensors(dest: Path, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
                  hasher: Any = None) -> int:
    """Write in-memory tensors (on the CPU, contiguous) into one safetensors file, byte for byte what
    ``save_file`` writes (which orders several metadata entries at random), and return its size.

    ``hasher`` (``update(bytes)``), where given, is fed the file's bytes as they are written: a
    checksum from memory, without reading the file back.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp()); t = {"b": torch.ones(3, dtype=torch.int8), "a": torch.arange(4.0)}
        >>> size = write_tensors(d / "ours.safetensors", t, metadata={"format": "pt"})
        >>> save_file(t, str(d / "lib.safetensors"), metadata={"format": "pt"})
        >>> (d / "ours.safetensors").read_bytes() == (d / "lib.safetensors").read_bytes(), size
        (True, 171)
    """
    specs = [_Spec(k, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    return _write(dest, specs, metadata, lambda spec: tensors[spec.key], hasher)


def write_file(ckpt: Checkpoint, dest: Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write every tensor of ``ckpt`` into one safetensors file at ``dest``."""
    write_entries(list(ckpt.tensors()), dest, metadata)
