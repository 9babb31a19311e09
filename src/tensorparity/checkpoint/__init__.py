"""Open anything as a lazy, flat tree of entries: ``tensorparity.open(source)``.

Formats are small objects in a registry (:mod:`tensorparity.checkpoint.format_registry`), found
by sniffing the first bytes of a file or the names in a folder; nothing is guessed from the
extension alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorparity.checkpoint.format_registry import (
    Format,
    Probe,
    WritableFormat,
    detect_format,
    formats,
    open_path,
    register_format,
    unregister_format,
)
from tensorparity.checkpoint.module import read_live
from tensorparity.checkpoint.tree import Checkpoint, Entry, PlaceholderInfo, TensorEntry, ValueEntry

__all__ = [
    "Checkpoint",
    "Entry",
    "Format",
    "InspectReport",
    "PlaceholderInfo",
    "Probe",
    "TensorEntry",
    "ValueEntry",
    "WritableFormat",
    "detect_format",
    "formats",
    "inspect",
    "open",
    "register_format",
    "unregister_format",
]


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
        return open_path(Path(source))
    if isinstance(source, Mapping) or hasattr(source, "state_dict"):
        return read_live(source)
    raise TypeError(f"cannot open a {type(source).__name__}; pass a path, an nn.Module or a state dict")


def open_owned(source: Any, owned: list[Checkpoint]) -> Checkpoint:
    """:func:`open` a source unless it is a :class:`Checkpoint` already; what this opened goes into
    ``owned``, for the caller to close (a caller's own checkpoint is left open)."""
    if isinstance(source, Checkpoint):
        return source
    ckpt = open(source)
    owned.append(ckpt)
    return ckpt


# A checkpoint's own summary (what it prints in a notebook); it opens sources with open() above.
from tensorparity.checkpoint._inspect import InspectReport, inspect  # noqa: E402
