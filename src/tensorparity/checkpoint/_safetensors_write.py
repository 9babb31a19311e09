"""Stream tensors into safetensors files, one tensor in memory at a time.

The safetensors library cannot stream: ``save_file`` takes a dict of every tensor, in memory,
at once. But a safetensors header (JSON: dtype, shape and byte offsets of each tensor) depends
on shapes and dtypes alone, so it is computed from metadata, written first, and the tensors'
bytes follow one by one. Tensors are laid out as the library lays them out (by dtype, widest
first, then by name; header padded with spaces to 8 bytes), so for the same tensors and
metadata the file is byte-for-byte what ``save_file`` writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import torch

from tensorparity.checkpoint._torch_zip_write import load_checked
from tensorparity.checkpoint.tree import Checkpoint, TensorEntry
from tensorparity.errors import UsageError

__all__ = ["INDEX_NAME", "layout", "write_file", "write_sharded", "write_tensors"]

INDEX_NAME = "model.safetensors.index.json"

# The library's dtype codes, widest first, in the order it sorts them (its Dtype enum, descending).
_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0",
          "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "I8", "U8", "BOOL")
_CODES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2: "F8_E5M2", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
if hasattr(torch, "float8_e8m0fnu"):
    _CODES[torch.float8_e8m0fnu] = "F8_E8M0"


class _Described(Protocol):
    """What the header needs of a tensor: a :class:`TensorEntry`, or a :class:`_Spec` of one in memory."""

    @property
    def key(self) -> str: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...


class _Spec(NamedTuple):
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _code(entry: _Described, dest: Path) -> str:
    code = _CODES.get(entry.dtype)
    if code is None:
        raise UsageError(f"safetensors has no dtype for {str(entry.dtype).removeprefix('torch.')}", path=dest,
                         key=entry.key, fix="cast the tensor in a mapping, or write torch or dcp")
    return code


def layout(entries: Sequence[Any], metadata: Mapping[str, str] | None, dest: Path) -> tuple[bytes, list[Any]]:
    """The header bytes (length prefix included) and the order the tensors' bytes follow in.

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


def _write_bytes(out: IO[bytes], tensor: torch.Tensor) -> None:
    if tensor.numel():
        # A uint8 view of the dense tensor: no copy, and numpy hands the buffer to write().
        out.write(tensor.reshape(-1).view(torch.uint8).numpy())


def _write_tensors(ckpt: Checkpoint, entries: list[TensorEntry], dest: Path,
                   metadata: Mapping[str, str] | None) -> None:
    head, order = layout(entries, metadata, dest)
    with open(dest, "wb") as out:
        out.write(head)
        for entry in order:
            tensor = load_checked(entry)
            _write_bytes(out, tensor)
            del tensor


def write_tensors(dest: Path, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None,
                  hasher: Any = None) -> int:
    """Write in-memory tensors (on the CPU, contiguous) into one safetensors file, byte for byte what
    ``save_file`` writes (which orders several metadata entries at random), and return its size. ``hasher`` (``update(bytes)``), where given, is fed the
    file's bytes as they are written: a checksum from memory, without reading the file back.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp()); t = {"b": torch.ones(3, dtype=torch.int8), "a": torch.arange(4.0)}
        >>> size = write_tensors(d / "ours.safetensors", t, metadata={"format": "pt"})
        >>> save_file(t, str(d / "lib.safetensors"), metadata={"format": "pt"})
        >>> (d / "ours.safetensors").read_bytes() == (d / "lib.safetensors").read_bytes(), size
        (True, 171)
    """
    specs = [_Spec(k, t.dtype, tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    head, order = layout(specs, metadata, dest)
    update = hasher.update if hasher is not None else None
    with open(dest, "wb") as out:
        out.write(head)
        if update is not None:
            update(head)
        for spec in order:
            if spec.nbytes:
                data = tensors[spec.key].reshape(-1).view(torch.uint8).numpy()
                out.write(data)
                if update is not None:
                    update(data)
    return len(head) + sum(spec.nbytes for spec in order)


def write_file(ckpt: Checkpoint, dest: Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write every tensor of ``ckpt`` into one safetensors file at ``dest``."""
    _write_tensors(ckpt, list(ckpt.tensors()), dest, metadata)


def shards(entries: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Split entries, in order, into shards of at most ``max_shard_size`` bytes each (a larger
    tensor gets a shard of its own), as ``save_pretrained`` does.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> es = list(tp_open({"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(8)}).tensors())
        >>> [[e.key for e in s] for s in shards(es, 32)]
        [['a', 'b'], ['c']]
    """
    out: list[list[TensorEntry]] = []
    size = 0
    for e in entries:
        if not out or (size + e.nbytes > max_shard_size and out[-1]):
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return out or [[]]


def write_sharded(ckpt: Checkpoint, dest: Path, *, max_shard_size: int,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ckpt`` as a Hugging Face sharded folder: ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` (``metadata.total_size`` plus ``metadata``)."""
    entries = list(ckpt.tensors())
    parts = shards(entries, max_shard_size)
    dest.mkdir()
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        _write_tensors(ckpt, part, dest / name, {"format": "pt"})
        weight_map.update({e.key: name for e in part})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries), **dict(metadata or {})},
             "weight_map": weight_map}
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
