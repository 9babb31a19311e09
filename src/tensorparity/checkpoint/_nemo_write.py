"""Write a ``.nemo`` archive: ``model_config.yaml``, ``model_weights.ckpt``, artifacts, record.

The layout is what NeMo's ``SaveRestoreConnector`` writes (a plain tar, members named ``./...``).
The weights are a torch zip streamed straight into the tar, one tensor at a time: the member's
512-byte header is reserved, the zip written after it, and the header filled in once the size is
known (GNU format, so sizes past 8 GiB fit in the one header block). Nothing is extracted or
staged on disk.

The config comes from ``metadata["nemo.model_config"]`` when given, else from the source
``.nemo``; a source ``.nemo``'s artifacts (tokenizer files...) are copied member by member.
Every source member is checked as the reader checks it (no links, no absolute paths, no ``..``).
tensorparity's migration record (the value ``tensorparity_migrations`` of a ``.nemo``
checkpoint) is written as the member ``tensorparity_migrations.json`` beside the config, never
into it.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from tensorparity.checkpoint._torch_zip_write import write_torch_zip
from tensorparity.checkpoint.layout import RECORD_KEY
from tensorparity.checkpoint.layout import RECORD_METADATA_KEY as METADATA_KEY
from tensorparity.checkpoint.nemo import (
    CONFIG,
    MAX_CONFIG_BYTES,
    RECORD_MEMBER,
    WEIGHTS,
    checked_member_name,
    classify_member,
)
from tensorparity.checkpoint.tree import Checkpoint, ValueEntry
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError, UsageError

__all__ = ["read_config", "write_nemo"]

_CONFIG_KEY = "nemo.model_config"
_BLOCK = 512
_CHUNK = 1 << 20


def _members(path: Path) -> Iterator[tuple[str, int, IO[bytes]]]:
    """``(name, size, reader)`` of every regular file of a ``.nemo`` (tar, tar.gz or folder)."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
            with open(file, "rb") as f:
                yield file.relative_to(path).as_posix(), file.stat().st_size, f
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = checked_member_name(member, path)
                if not member.isfile():
                    continue
                reader = tar.extractfile(member)
                if reader is not None:
                    yield name, member.size, reader
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptCheckpointError(f"could not read the archive ({exc})", path=path,
                                     fix="the .nemo is truncated or corrupt; copy it again") from exc


def read_config(path: Path) -> bytes | None:
    """The bytes of a ``.nemo``'s ``model_config.yaml`` (``None`` when it has none).

    Example:
        >>> import tarfile, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model_config.yaml").write_text("a: 1\\n")
        >>> read_config(d)
        b'a: 1\\n'
    """
    for name, size, reader in _members(path):
        if name == CONFIG:
            if size > MAX_CONFIG_BYTES:
                raise UnsafeCheckpointError(f"config of {size} bytes is larger than the {MAX_CONFIG_BYTES}-byte "
                                            "limit", path=path, key=CONFIG, fix="a NeMo config is a few KB")
            return reader.read(size)
    return None


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _pad(out: IO[bytes], size: int) -> None:
    out.write(b"\0" * (-size % _BLOCK))


def _copy(out: IO[bytes], name: str, size: int, reader: IO[bytes], source: Path) -> None:
    out.write(_header(f"./{name}", size))
    left = size
    while left:
        chunk = reader.read(min(_CHUNK, left))
        if not chunk:
            raise CorruptCheckpointError("archive ends inside this member", path=source, key=name,
                                         fix="the .nemo is truncated; copy it again")
        out.write(chunk)
        left -= len(chunk)
    _pad(out, size)


def write_nemo(ckpt: Checkpoint, body: Checkpoint, dest: Path, *, structure: Any, metadata: Mapping[str, str]) -> None:
    """Write ``body`` (the weights of ``ckpt``) as a ``.nemo`` at ``dest``."""
    extra = dict(metadata)
    text = extra.pop(_CONFIG_KEY, None)
    source = Path(ckpt.source)
    from_nemo = ckpt.format == "nemo" and (source.is_file() or source.is_dir())
    config = text.encode("utf-8") if text is not None else read_config(source) if from_nemo else None
    if config is None:
        raise UsageError(f"a .nemo needs a {CONFIG}, and {ckpt.source} carries none", path=dest,
                         fix="convert from a .nemo, or from a file converted from one (it carries the config as "
                             "metadata 'nemo.model_config'), or write torch or safetensors")
    ranks = ckpt.provenance.get("model_parallel_ranks")
    if ranks:
        raise UsageError(f"the source holds {len(ranks)} model-parallel ranks, which a single {WEIGHTS} cannot",
                         path=dest, fix="convert to torch, safetensors or dcp instead")
    # The record: the checkpoint's own (a .nemo read or migrated), else the metadata string a
    # migrated .nemo's record travels as through other formats.
    entry = ckpt.get(RECORD_KEY) if ckpt.format == "nemo" else None
    carried = extra.pop(METADATA_KEY, None)
    text = entry.value if isinstance(entry, ValueEntry) and isinstance(entry.value, str) else carried
    record = text.encode("utf-8") if text is not None else None
    with open(dest, "wb") as out:
        for name, data in ((CONFIG, config), (RECORD_MEMBER, record)):
            if data is not None:
                out.write(_header(f"./{name}", len(data)))
                out.write(data)
                _pad(out, len(data))
        # The weights member: header reserved, zip streamed, header written once the size is known.
        at = out.tell()
        out.write(b"\0" * _BLOCK)
        write_torch_zip(body, out, structure=structure, metadata=extra)
        size = out.tell() - at - _BLOCK
        _pad(out, size)
        end = out.tell()
        header = _header(f"./{WEIGHTS}", size)
        assert len(header) == _BLOCK, "a short name and GNU numbers fit one block"
        out.seek(at)
        out.write(header)
        out.seek(end)
        if from_nemo:
            for name, size, reader in _members(source):
                if name != CONFIG and classify_member(name) is None and not name.startswith("model_weights/"):
                    _copy(out, name, size, reader, source)
        out.write(b"\0" * (2 * _BLOCK))  # end of archive
