"""Open anything as a lazy, flat tree of entries: ``tensorparity.open(source)``.

Formats are small readers in this package, found by sniffing the first bytes of a file or the
names in a folder; nothing is guessed from the extension alone.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorparity.checkpoint.tree import Checkpoint, Entry, PlaceholderInfo, TensorEntry, ValueEntry
from tensorparity.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
    TensorParityError,
    UnknownFormatError,
)

__all__ = [
    "Checkpoint",
    "Entry",
    "InspectReport",
    "PlaceholderInfo",
    "TensorEntry",
    "ValueEntry",
    "detect_format",
    "inspect",
    "open",
]

# Files a plain folder may hold, in the order they are preferred when a folder holds one.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".nemo", ".npz", ".tar")
_OPEN_FIX = "pass a checkpoint written by torch.save, Lightning, NeMo, safetensors, torch.distributed.checkpoint or numpy.savez"


def _is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _is_legacy_torch(head: bytes) -> bool:
    # pickle protocol 2 of torch's magic number: PROTO 2, LONG1 with 10 bytes.
    return head[:3] == b"\x80\x02\x8a" and head[3:4] == b"\x0a"


def detect_format(path: Path) -> str:
    """Name the format of a file or folder by its content.

    Example:
        >>> import tempfile, torch, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.pt"; torch.save({"w": torch.ones(1)}, p)
        >>> detect_format(p)
        'zip'
    """
    if path.is_dir():
        names = set(os.listdir(path))
        if ".metadata" in names:
            return "dcp"
        if any(n.endswith(".safetensors.index.json") or n.endswith(".bin.index.json") for n in names):
            return "hf-sharded"
        if "model_config.yaml" in names:
            return "nemo-folder"
        from tensorparity.checkpoint.tracefolder.as_checkpoint import is_trace_dir

        if is_trace_dir(path):
            return "trace"
        return "folder"
    if not path.is_file():  # a FIFO or a device would block or never end
        raise UnknownFormatError("not a regular file or folder", path=path, fix=_OPEN_FIX)
    if path.name.endswith((".safetensors.index.json", ".bin.index.json")):
        return "hf-sharded"
    with builtins.open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CorruptCheckpointError("the file is empty", path=path, fix="copy or save it again")
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:2] == b"\x1f\x8b" or _is_tar(head):
        return "nemo"
    if _is_safetensors(head):
        return "safetensors"
    if _is_legacy_torch(head):
        return "torch-legacy"
    raise UnknownFormatError("unrecognised file format", path=path, fix=_OPEN_FIX)


def _open_folder(path: Path) -> Checkpoint:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(files) == 1:
        return _open_path(files[0])
    listing = ", ".join(p.name for p in files[:5]) or "no checkpoint files"
    raise UnknownFormatError(
        f"folder is not a known checkpoint layout and holds {listing}", path=path,
        fix="pass one file, a sharded folder with an *.index.json, or a torch.distributed.checkpoint folder")


def _open_path(path: Path) -> Checkpoint:
    kind = detect_format(path)
    if kind == "zip":
        from tensorparity.checkpoint import npz, torch_zip

        if npz.is_npz(path):
            return npz.read_npz(path)
        return torch_zip.read_torch_zip(path)
    if kind == "safetensors":
        from tensorparity.checkpoint.safetensors import read_safetensors

        return read_safetensors(path)
    if kind == "torch-legacy":
        from tensorparity.checkpoint.torch_legacy import read_legacy

        return read_legacy(path)
    if kind in ("nemo", "nemo-folder"):
        from tensorparity.checkpoint.nemo import read_nemo

        return read_nemo(path)
    if kind == "dcp":
        from tensorparity.checkpoint.dcp import read_dcp

        return read_dcp(path)
    if kind == "hf-sharded":
        from tensorparity.checkpoint.hf_sharded import read_sharded

        return read_sharded(path)
    if kind == "trace":
        from tensorparity.checkpoint.tracefolder.as_checkpoint import read_trace_dir

        return read_trace_dir(path)
    return _open_folder(path)


def open(source: str | os.PathLike[str] | Any, /) -> Checkpoint:  # noqa: A001 - the library's verb
    """Open a checkpoint of any supported format, a live ``nn.Module`` or a state dict.

    Nothing in the file is executed and no tensor is read until its entry's ``load()`` is called.

    Args:
        source: a path (file or folder), an ``nn.Module``, a (nested) mapping of tensors, or a
            :class:`Checkpoint` (returned as it is).

    Returns:
        A :class:`Checkpoint`: a mapping from dotted key to entry.

    Raises:
        SourceNotFoundError: the path does not exist.
        UnknownFormatError: no reader recognises it.
        CorruptCheckpointError: the bytes are malformed.
        UnsafeCheckpointError: the input was refused for safety.

    Example:
        >>> import torch, tensorparity
        >>> ckpt = tensorparity.open({"layer.weight": torch.zeros(2, 3)})
        >>> ckpt["layer.weight"].shape
        (2, 3)
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            exists = path.exists()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise SourceNotFoundError(f"not a usable path ({exc})", path=path, fix="check the path") from exc
        if not exists:
            raise SourceNotFoundError("no such file or folder", path=path, fix="check the path")
        try:
            return _open_path(path)
        except TensorParityError as exc:
            raise exc.with_path(path)
        except (OSError, MemoryError, RecursionError) as exc:
            raise CorruptCheckpointError(f"could not be read ({type(exc).__name__}: {exc})", path=path,
                                         fix="check that the file is complete and readable") from exc
    from tensorparity.checkpoint.module import read_live

    if isinstance(source, Mapping) or hasattr(source, "state_dict"):
        return read_live(source)
    raise TypeError(f"cannot open a {type(source).__name__}; pass a path, an nn.Module or a state dict")


# A checkpoint's own summary (what it prints in a notebook); it opens sources with open() above.
from tensorparity.checkpoint._inspect import InspectReport, inspect  # noqa: E402
