"""The registry of checkpoint formats: every format is one small object behind :class:`Format`.

A format says what it is called, recognises its files by content (:meth:`Format.detect` looks
at a :class:`Probe`: a folder's names or a file's first bytes; nothing is guessed from a
suffix alone) and reads them into a :class:`~tensorparity.checkpoint.Checkpoint`; a format
tensorparity also writes is a :class:`WritableFormat`. :func:`detect_format`,
``tensorparity.open`` and :func:`~tensorparity.checkpoint.write.write_checkpoint` are lookups
here; ``write.FORMATS`` lists the writable names.

Two orders, both fixed: formats are *listed* in the order they were registered (the built-in
writable ones first: ``torch, safetensors, safetensors-sharded, dcp, nemo``), and *detected*
in detection order, where the more specific claim comes first (a folder holding DCP's
``.metadata`` is DCP even beside an ``*.index.json``; an npz is a zip, so it is asked before
torch). A folder no format claims is read as the one checkpoint file it holds.

Another package adds a format with :func:`register_format` (and removes it with
:func:`unregister_format`); it is asked after the built-in ones unless ``before`` names one.

Example:
    >>> [f.name for f in formats()][:4]
    ['dcp', 'safetensors-sharded', 'nemo-folder', 'trace']
    >>> format_names(writable=True)
    ('torch', 'safetensors', 'safetensors-sharded', 'dcp', 'nemo')
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tensorparity.checkpoint._builtin_formats import BUILTIN, DETECTION_ORDER
from tensorparity.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
    TensorParityError,
    UnknownFormatError,
    UsageError,
)

if TYPE_CHECKING:
    from tensorparity.checkpoint.tree import Checkpoint

__all__ = ["Format", "Probe", "WritableFormat", "checkpoint_suffixes", "detect_format", "find_format",
           "format_names", "formats", "get_format", "open_path", "read_path", "register_format",
           "unregister_format", "writable_formats"]

HEAD_BYTES = 512  # what Probe.head holds: enough for every magic number, a tar header included
_OPEN_FIX = ("pass a checkpoint written by torch.save, Lightning, NeMo, safetensors, torch.distributed.checkpoint "
             "or numpy.savez")


@dataclass(frozen=True)
class Probe:
    """What :meth:`Format.detect` looks at; a folder's names and a file's head are read once, on
    first use, and shared by every format asked.

    Attributes:
        path: the file or folder.
        is_dir: whether it is a folder (else a regular file).
    """

    path: Path
    is_dir: bool

    @cached_property
    def names(self) -> frozenset[str]:
        """The names in the folder (empty for a file)."""
        return frozenset(os.listdir(self.path)) if self.is_dir else frozenset()

    @cached_property
    def head(self) -> bytes:
        """The file's first :data:`HEAD_BYTES` bytes (empty for a folder)."""
        if self.is_dir:
            return b""
        with builtins.open(self.path, "rb") as f:
            return f.read(HEAD_BYTES)


@runtime_checkable
class Format(Protocol):
    """A checkpoint format: a name, a detector and a reader.

    Attributes:
        name: unique in the registry; a writable format's ``--format`` word.
        detected_as: what :func:`detect_format` calls it (formats in one container share it: an
            npz and a torch file are both ``zip``).
        suffixes: file names that hold it (a plain folder's one file is one of these; on
            output, the name that implies a writable format).
        produces: the ``Checkpoint.format`` values its reader gives.
        family: the writable format a checkpoint it read is written as by default.
    """

    name: str
    detected_as: str
    suffixes: tuple[str, ...]
    produces: tuple[str, ...]
    family: str

    def detect(self, probe: Probe) -> bool:
        """Whether the file or folder is in this format, judged by its content."""
        ...

    def read(self, path: Path) -> Checkpoint:
        """Open ``path`` lazily: no tensor is read until its entry's ``load()``."""
        ...


@runtime_checkable
class WritableFormat(Format, Protocol):
    """A format tensorparity also writes.

    Attributes:
        sharded: whether it takes ``max_shard_size`` (a suffix-less output name with a shard size
            implies it).
    """

    sharded: bool

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        """Refuse, before anything is written, what the format cannot hold (every key at once)."""
        ...

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        """Stream ``ckpt`` (checked, weights only) to ``dest``; ``source`` is the checkpoint it was
        taken from (a ``.nemo``'s config and record travel beside its weights)."""
        ...

    # Optional: ``metadata(ckpt) -> dict[str, str]``, the strings a checkpoint this format read
    # carries besides its header (a record inside a torch zip, a .nemo's config, DCP's file).
    # write.source_metadata asks every writable format that has it; each answers only for its own.


_BY_NAME: dict[str, Format] = {}  # registration order: how formats are listed
_DETECTION: list[Format] = []  # the order detection asks them


def register_format(fmt: Format, *, before: str | None = None) -> Format:
    """Add a format: :func:`detect_format`, ``tensorparity.open`` and, if it writes, the writers
    use it from now on.

    Args:
        fmt: an object with the attributes and methods of :class:`Format` (and of
            :class:`WritableFormat` to be written).
        before: ask it before the format of this name (for a format whose files another's
            detector would also claim); default: after every registered format.

    Returns:
        ``fmt`` itself: ``MINE = register_format(Mine())`` registers it and keeps it at hand.

    Raises:
        TypeError: ``fmt`` lacks something of :class:`Format`.
        UsageError: the name is taken, or ``before`` names no format.
    """
    if not isinstance(fmt, Format):
        raise TypeError(f"{fmt!r} is not a checkpoint Format: it needs name, detected_as, suffixes, produces, "
                        "family, detect() and read()")
    if fmt.name in _BY_NAME:
        raise UsageError(f"a checkpoint format named {fmt.name!r} is registered already",
                         fix="pick another name, or unregister_format() the other first")
    at = len(_DETECTION) if before is None else _DETECTION.index(get_format(before))
    _BY_NAME[fmt.name] = fmt
    _DETECTION.insert(at, fmt)
    return fmt


def unregister_format(name: str) -> Format:
    """Remove the format of this name (and return it); files of it are no longer recognised."""
    fmt = get_format(name)
    del _BY_NAME[name]
    _DETECTION.remove(fmt)
    return fmt


def get_format(name: str) -> Format:
    """The registered format of this name.

    Example:
        >>> get_format("safetensors").suffixes
        ('.safetensors',)
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"no checkpoint format is named {name!r}",
                         fix=f"use one of {', '.join(_BY_NAME)}") from None


def formats() -> tuple[Format, ...]:
    """Every registered format, in the order detection asks them."""
    return tuple(_DETECTION)


def format_names(*, writable: bool = False) -> tuple[str, ...]:
    """The registered names in registration order; ``writable=True``: those tensorparity writes."""
    return tuple(f.name for f in (writable_formats() if writable else _BY_NAME.values()))


def writable_formats() -> tuple[WritableFormat, ...]:
    """The formats tensorparity writes, in registration order."""
    return tuple(f for f in _BY_NAME.values() if isinstance(f, WritableFormat))


def checkpoint_suffixes() -> tuple[str, ...]:
    """File suffixes some format holds: what a plain folder's one checkpoint file may be named."""
    return tuple(dict.fromkeys(s for f in _BY_NAME.values() for s in f.suffixes))


def find_format(path: Path) -> Format | None:
    """The first format, in detection order, that claims ``path``; ``None`` for a folder none
    claims (read as the one checkpoint file it holds).

    Raises:
        UnknownFormatError: a file no format claims, or neither a regular file nor a folder.
        CorruptCheckpointError: an empty file.
    """
    if path.is_dir():
        probe = Probe(path, is_dir=True)
    elif path.is_file():
        probe = Probe(path, is_dir=False)
    else:  # a FIFO or a device would block or never end
        raise UnknownFormatError("not a regular file or folder", path=path, fix=_OPEN_FIX)
    for fmt in _DETECTION:
        if fmt.detect(probe):
            return fmt
    if probe.is_dir:
        return None
    if not probe.head:
        raise CorruptCheckpointError("the file is empty", path=path, fix="copy or save it again")
    raise UnknownFormatError("unrecognised file format", path=path, fix=_OPEN_FIX)


def detect_format(path: Path) -> str:
    """Name the format of a file or folder by its content (``folder``: a plain folder).

    Example:
        >>> import tempfile, torch, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.pt"; torch.save({"w": torch.ones(1)}, p)
        >>> detect_format(p)
        'zip'
    """
    fmt = find_format(path)
    return "folder" if fmt is None else fmt.detected_as


def read_path(path: Path) -> Checkpoint:
    """Read ``path`` with the format that claims it (errors as the reader raises them)."""
    fmt = find_format(path)
    return _read_folder(path) if fmt is None else fmt.read(path)


def _read_folder(path: Path) -> Checkpoint:
    suffixes = checkpoint_suffixes()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if len(files) == 1:
        return read_path(files[0])
    listing = ", ".join(p.name for p in files[:5]) or "no checkpoint files"
    raise UnknownFormatError(
        f"folder is not a known checkpoint layout and holds {listing}", path=path,
        fix="pass one file, a sharded folder with an *.index.json, or a torch.distributed.checkpoint folder")


def open_path(path: Path) -> Checkpoint:
    """``tensorparity.open`` of a path: every failure a :class:`TensorParityError` naming it.

    Raises:
        SourceNotFoundError: the path does not exist.
        UnknownFormatError: no format claims it.
        CorruptCheckpointError: the bytes are malformed, or could not be read.
        UnsafeCheckpointError: the input was refused for safety.
    """
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise SourceNotFoundError(f"not a usable path ({exc})", path=path, fix="check the path") from exc
    if not exists:
        raise SourceNotFoundError("no such file or folder", path=path, fix="check the path")
    try:
        return read_path(path)
    except TensorParityError as exc:
        raise exc.with_path(path)
    except (OSError, MemoryError, RecursionError) as exc:
        raise CorruptCheckpointError(f"could not be read ({type(exc).__name__}: {exc})", path=path,
                                     fix="check that the file is complete and readable") from exc


for _fmt in BUILTIN:
    _BY_NAME[_fmt.name] = _fmt
_DETECTION.extend(_BY_NAME[name] for name in DETECTION_ORDER)
assert len(_DETECTION) == len(_BY_NAME), "every built-in format has its place in the detection order"
del _fmt
