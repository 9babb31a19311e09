"""NeMo ``.nemo`` archives (and their extracted folders), read without extracting.

NeMo's ``SaveRestoreConnector`` writes a folder and tars it with ``arcname="."``::

    ./model_config.yaml                       the model's config
    ./model_weights.ckpt                      torch.save of the state dict
    ./mp_rank_00/model_weights.ckpt           ... or one per model-parallel rank
    ./tp_rank_00_pp_rank_000/model_weights.ckpt
    ./<uuid hex>_tokenizer.model              artifacts the model registered
    ./tensorparity_migrations.json            tensorparity's migration record (when it migrated the file)

The migration record is a member of its own, not a key of ``model_config.yaml``: NeMo carries
its config into every later ``save_to``, and the record is tensorparity's, not the model's. It
opens as the value ``tensorparity_migrations`` in the section ``records``.

NeMo >= 1.7 writes a plain tar; older releases wrote tar.gz. A plain tar is never extracted: the
weights are torch zips read in place at their member's offset. A gzip tar is streamed once; only
the weights members are copied into a private temporary folder (removed on ``close()``), with a
cap on inflated bytes against gzip bombs. Every member is checked before use: absolute paths,
``..``, links, devices and fifos refuse the whole archive.

Writing (config, weights, artifacts, record): The layout is what NeMo's ``SaveRestoreConnector`` writes (a plain tar, members named ``./...``).
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

import gzip
import io
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tensorparity.checkpoint import torch_legacy, torch_zip
from tensorparity.checkpoint.format_registry import read_path
from tensorparity.checkpoint.layout import RECORD_KEY, detect_sections
from tensorparity.checkpoint.layout import RECORD_METADATA_KEY as METADATA_KEY
from tensorparity.checkpoint.tree import Checkpoint, Entry, PlaceholderInfo, ValueEntry, flatten
from tensorparity.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError, UsageError

# The archive's layout and member checks are shared by the reader and the writer below: one
# definition of what a .nemo holds and which members are refused.
__all__ = ["CONFIG", "CONFIG_KEY", "MAX_CONFIG_BYTES", "RECORD_MEMBER", "WEIGHTS", "checked_member_name", "classify_member",
           "read_config", "read_nemo", "write_nemo"]

CONFIG = "model_config.yaml"
RECORD_MEMBER = RECORD_KEY + ".json"  # tensorparity's migration record, beside the config
WEIGHTS = "model_weights.ckpt"
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_VALUES = 1_000_000  # a YAML alias bomb expands past this when flattened
MAX_INFLATED_MIN = 1 << 30  # a gzip .nemo may inflate to max(this, MAX_RATIO x its size)
MAX_RATIO = 200
MAX_HEADER_BYTES = 16 << 20  # one tar header with its pax records and long names
_RANK_DIR = re.compile(r"(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)")
_FIX_CORRUPT = "the .nemo is truncated or corrupt; copy it again or re-save it with model.save_to()"
_FIX_UNSAFE = "refusing the whole archive; re-create the .nemo with model.save_to(), which writes only regular files"


@dataclass
class _Parts:
    """What a .nemo holds, located but not read."""

    config: bytes | None = None
    record: bytes | None = None
    # rank ("" for one) -> (file, offset, length, display): where the torch.save bytes lie
    weights: dict[str, tuple[Path, int, int | None, str]] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)
    sharded_weights: bool = False


def read_nemo(path: Path) -> Checkpoint:
    """Open a ``.nemo`` archive (plain tar or tar.gz) or an extracted ``.nemo`` folder.

    Weights keep their state-dict keys (prefixed ``mp_rank_00.`` etc. when there are several
    model-parallel ranks); the config is under ``model_config.``, artifacts under ``artifacts.``.

    Args:
        path: the ``.nemo`` file, or a folder holding ``model_config.yaml``.

    Raises:
        UnsafeCheckpointError: a member is a link, a device, absolute, or climbs out with ``..``;
            or a gzip archive inflates past the limit.
        CorruptCheckpointError: truncated archive, bad YAML, or no ``model_weights.ckpt``.
        UnknownFormatError: a tar that is not a .nemo, or sharded weights inside an archive.

    Example:
        >>> import tarfile, tempfile, pathlib, torch, yaml
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "m").mkdir()
        >>> _ = (d / "m" / "model_config.yaml").write_text(yaml.safe_dump({"target": "a.B", "hidden": 4}))
        >>> torch.save({"w": torch.ones(2)}, d / "m" / "model_weights.ckpt")
        >>> with tarfile.open(d / "x.nemo", "w:") as tar: tar.add(d / "m", arcname=".")
        >>> ckpt = read_nemo(d / "x.nemo")
        >>> ckpt["w"].load(), ckpt["model_config.hidden"].value, ckpt.provenance["target"]
        (tensor([1., 1.]), 4, 'a.B')
    """
    if path.is_dir():
        return _read_folder(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    closers: list[Callable[[], None]] = []
    parts = _gzip_parts(path, closers) if gzipped else _tar_parts(path)
    try:
        return _assemble(path, parts, compression="gzip" if gzipped else "none", closers=closers)
    except BaseException:
        for close in closers:
            close()
        raise


def checked_member_name(member: tarfile.TarInfo, path: Path) -> str:
    """The member's name without ``./``; refuses anything that could reach outside the archive."""
    name = member.name
    reason = None
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        reason = "has an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        reason = "climbs out of the archive with '..'"
    elif member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        reason = f"is a {kind} link (to {member.linkname!r})"
    elif member.ischr() or member.isblk():
        reason = "is a device file"
    elif member.isfifo():
        reason = "is a fifo"
    elif member.issparse():
        reason = "is a sparse file, whose bytes are not stored in one piece"
    elif not (member.isfile() or member.isdir()):
        reason = f"has unsupported type {member.type!r}"
    if reason:
        raise UnsafeCheckpointError(f"archive member {reason}; the archive is refused", path=path,
                                    key=name, fix=_FIX_UNSAFE)
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def classify_member(name: str) -> str | None:
    """``"config"``, ``"record"``, the weights' rank (``"rank:"`` for one), or None for an artifact."""
    if name == CONFIG:
        return "config"
    if name == RECORD_MEMBER:
        return "record"
    head, _, tail = name.rpartition("/")
    if tail == WEIGHTS and (head == "" or _RANK_DIR.fullmatch(head)):
        return f"rank:{head}"
    return None


def _note_member(parts: _Parts, member: tarfile.TarInfo, name: str, path: Path, seen: set[str]) -> str | None:
    """Record a checked member; return what :func:`classify_member` says, None for artifacts and folders."""
    if member.isdir():
        parts.sharded_weights |= name.rpartition("/")[2] == "model_weights"
        return None
    kind = classify_member(name)
    if kind is not None and name in seen:
        raise CorruptCheckpointError("member appears twice in the archive, so which copy NeMo uses is "
                                     "ambiguous", path=path, key=member.name,
                                     fix="re-create the .nemo with model.save_to(), which writes each member once")
    seen.add(name)
    if kind in ("config", "record"):
        _cap_config(member.size, path, member.name)
    elif kind is None:
        parts.artifacts[name] = member.size
    return kind


def _check_not_old_torch(names: set[str], path: Path) -> None:
    if {"storages", "tensors", "pickle"} <= names:
        raise UnknownFormatError("a torch.save file in the pre-0.4 tar format, which is not read", path=path,
                                 fix="load it with the old torch that wrote it and re-save it with a recent torch.save")


# ---------------------------------------------------------------------------------------------
# Plain tar: list members, read in place


def _tar_parts(path: Path) -> _Parts:
    size = path.stat().st_size
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                members.append(member)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        where = f"in or after member {members[-1].name!r}" if members else "in its first header"
        raise CorruptCheckpointError(f"tar archive breaks off {where} ({exc})", path=path,
                                     key=members[-1].name if members else None, fix=_FIX_CORRUPT) from exc
    names = [checked_member_name(m, path) for m in members]  # every member checked before any is used
    _check_not_old_torch(set(names), path)
    parts = _Parts()
    seen: set[str] = set()
    with open(path, "rb") as f:
        for member, name in zip(members, names):
            if member.offset_data + member.size > size:
                raise CorruptCheckpointError(f"archive ends inside this member ({member.size} bytes at "
                                             f"{member.offset_data}, file has {size})", path=path,
                                             key=member.name, fix=_FIX_CORRUPT)
            kind = _note_member(parts, member, name, path, seen)
            if kind in ("config", "record"):
                f.seek(member.offset_data)
                setattr(parts, kind, f.read(member.size))
            elif kind is not None:
                parts.weights[kind[5:]] = (path, member.offset_data, member.size, f"{path}::{member.name}")
    return parts


def _cap_config(size: int, path: Path, key: str) -> None:
    if size > MAX_CONFIG_BYTES:
        raise UnsafeCheckpointError(f"config of {size} bytes is larger than the {MAX_CONFIG_BYTES}-byte limit",
                                    path=path, key=key, fix="a NeMo config is a few KB; check the file")


# ---------------------------------------------------------------------------------------------
# gzip tar: stream once, copy only the weights out, count every inflated byte


class _Counted:
    """A gzip stream that refuses to inflate past ``limit`` bytes in all, or to inflate a tar
    header (pax records, long names) past ``MAX_HEADER_BYTES``: tarfile holds headers in memory."""

    def __init__(self, raw: IO[bytes], limit: int, path: Path) -> None:
        self.raw, self.limit, self.path = raw, limit, path
        self.count = 0
        self.member: str | None = None
        self.header_end = MAX_HEADER_BYTES

    def next_member(self, member: tarfile.TarInfo) -> None:
        self.member = member.name
        data_end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.header_end = data_end + MAX_HEADER_BYTES

    def read(self, n: int = -1) -> bytes:
        room = self.limit + 1 - self.count
        data = self.raw.read(room if n < 0 else min(n, room))
        self.count += len(data)
        if self.count > self.limit:
            raise _bomb(self.path, self.member, "reading it would " + _past(self.limit))
        if self.count > self.header_end + tarfile.RECORDSIZE:  # tarfile reads whole records ahead
            after = f" after member {self.member!r}" if self.member else ""
            raise _bomb(self.path, None, f"a tar header{after} inflates past the {MAX_HEADER_BYTES}-byte limit")
        return data


def _bomb(path: Path, member: str | None, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{what}; refusing a possible gzip bomb", path=path, key=member,
                                 fix="if the archive is genuine, decompress it (gunzip) and open the plain tar")


def _past(limit: int) -> str:
    return f"inflate the archive past {limit} bytes ({MAX_RATIO}x its size, at least {MAX_INFLATED_MIN})"


def _gzip_parts(path: Path, closers: list[Callable[[], None]]) -> _Parts:
    limit = max(MAX_INFLATED_MIN, MAX_RATIO * path.stat().st_size)
    tmp = Path(tempfile.mkdtemp(prefix="tensorparity-nemo-"))
    closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    parts = _Parts()
    seen: set[str] = set()
    names: set[str] = set()
    counted: _Counted | None = None
    try:
        with gzip.open(path, "rb") as raw:
            counted = _Counted(raw, limit, path)
            with tarfile.open(fileobj=counted, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    counted.next_member(member)
                    name = checked_member_name(member, path)
                    names.add(name)
                    if member.size > limit - counted.count:
                        raise _bomb(path, member.name, f"member of {member.size} bytes would " + _past(limit))
                    kind = _note_member(parts, member, name, path, seen)
                    if kind in ("config", "record"):
                        _copy(tar, member, buffer := io.BytesIO(), path)
                        setattr(parts, kind, buffer.getvalue())
                    elif kind is not None:
                        dest = tmp / f"{kind[5:] or 'model'}.ckpt"
                        with open(dest, "xb") as out:
                            _copy(tar, member, out, path)
                        parts.weights[kind[5:]] = (dest, 0, None, f"{path}::{member.name}")
    except BaseException as exc:
        closers.pop()()  # nothing copied out outlives a failure
        if isinstance(exc, (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)):
            raise CorruptCheckpointError(f"unreadable gzip tar archive ({type(exc).__name__}: {exc})", path=path,
                                         key=counted.member if counted else None, fix=_FIX_CORRUPT) from exc
        raise
    _check_not_old_torch(names, path)
    return parts


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, out: IO[bytes], path: Path) -> None:
    src, copied = tar.extractfile(member), 0
    while src is not None and (chunk := src.read(1 << 20)):
        out.write(chunk)
        copied += len(chunk)
    if copied != member.size:
        raise CorruptCheckpointError("archive ends inside this member", path=path, key=member.name, fix=_FIX_CORRUPT)


def _read_folder(path: Path) -> Checkpoint:
    parts = _Parts()
    _cap_config((path / CONFIG).stat().st_size, path, CONFIG)
    parts.config = (path / CONFIG).read_bytes()
    sharded: Checkpoint | None = None
    for file in sorted(_walk(path)):
        name = file.relative_to(path).as_posix()
        kind = classify_member(name)
        if kind == "config":
            continue
        if kind == "record":
            _cap_config(file.stat().st_size, path, name)
            parts.record = file.read_bytes()
        elif kind is not None:
            parts.weights[kind[5:]] = (file, 0, None, str(file))
        elif not name.startswith("model_weights/"):
            parts.artifacts[name] = file.stat().st_size
    if not parts.weights and (path / "model_weights").is_dir():
        # Sharded (distributed) weights: the folder is read by the reader of its own format.
        sharded = read_path(path / "model_weights")
    try:
        return _assemble(path, parts, compression="none", closers=[sharded.close] if sharded else [],
                         sharded=sharded)
    except BaseException:
        if sharded is not None:
            sharded.close()
        raise


def _walk(path: Path) -> Iterator[Path]:
    # Symlinked folders are not followed: an extracted .nemo holds none.
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


# ---------------------------------------------------------------------------------------------
# Putting it together


def _assemble(path: Path, parts: _Parts, *, compression: str, closers: list[Callable[[], None]],
              sharded: Checkpoint | None = None) -> Checkpoint:
    if parts.config is None and not parts.weights:
        raise UnknownFormatError(f"tar archive holds neither {CONFIG} nor {WEIGHTS}: not a .nemo", path=path,
                                 fix="open a .nemo written by NeMo's model.save_to()")
    if not parts.weights and sharded is None and parts.sharded_weights:
        raise UnknownFormatError("weights are sharded in a model_weights/ folder, which is read from an "
                                 "extracted .nemo only", path=path, key="model_weights/",
                                 fix=f"extract it (mkdir out && tar -xf {path.name} -C out) and open the folder")
    if not parts.weights and sharded is None:
        raise CorruptCheckpointError(f"no {WEIGHTS} member", path=path, key=WEIGHTS,
                                     fix=f"the archive is incomplete; re-save it with model.save_to() so that it "
                                         f"holds {WEIGHTS}")
    config = _parse_config(parts.config, path) if parts.config is not None else None

    placeholders: list[PlaceholderInfo] = []
    entries: dict[str, Entry] = {}
    sections = {"model_config": "config", "artifacts": "artifacts"}
    formats: set[str] = set()
    structure: Any = None  # the weights' nested object, kept for writers (one rank only)
    for rank, (file, offset, length, display) in sorted(parts.weights.items()):
        obj = _read_weights(file, offset, length, display, closers, formats)
        if len(parts.weights) == 1 and rank == "":
            sections.update(detect_sections(obj)[1])
            prefix = "" if isinstance(obj, Mapping) and obj else "model_weights"
            structure = obj if not prefix else None
        else:
            prefix = rank or "model_weights"
        entries.update(flatten(obj, prefix=prefix, placeholders=placeholders))
    if sharded is not None:
        entries.update({k: sharded[k] for k in sharded})
        placeholders.extend(sharded.placeholders)
        formats.add(sharded.format)

    extra = flatten(config, prefix="model_config") if config is not None else {}
    for name, size in sorted(parts.artifacts.items()):
        extra[f"artifacts.{name}"] = ValueEntry(f"artifacts.{name}", {"size": size})
    if parts.record is not None:
        extra[RECORD_KEY] = ValueEntry(RECORD_KEY, parts.record.decode("utf-8", "replace"))
        sections[RECORD_KEY] = "records"
    for key, entry in extra.items():
        entries.setdefault(key, entry)  # a weights key never gives way to config or artifacts

    ranks = sorted(r for r in parts.weights if r)
    provenance: dict[str, Any] = {"framework": "nemo", "compression": compression, "model_parallel_ranks": ranks,
                                  "weights_format": ", ".join(sorted(formats))}
    provenance.update(_config_provenance(config))
    return Checkpoint(source=str(path), format="nemo", entries=entries, sections=sections,
                      default_section="model", provenance=provenance, placeholders=placeholders,
                      notes=[] if config is not None else [f"no {CONFIG} in the archive"], closers=closers,
                      structure=structure)


def _read_weights(file: Path, offset: int, length: int | None, display: str,
                  closers: list[Callable[[], None]], formats: set[str]) -> Any:
    with open(file, "rb") as f:
        f.seek(offset)
        head = f.read(16)
    if head[:4] == torch_zip.ZIP_MAGIC:
        obj, _, more = torch_zip.read_object(file, offset=offset, length=length, display=display)
        closers.extend(more)
        formats.add("torch-zip")
    elif torch_legacy.is_legacy(head):
        obj, _ = torch_legacy.read_legacy_object(file, offset=offset, length=length, display=display)
        formats.add("torch-legacy")
    else:
        raise CorruptCheckpointError("weights are neither a torch.save zip nor a legacy torch.save file",
                                     path=display, fix="re-save the model with NeMo's model.save_to()")
    return obj


def _parse_config(data: bytes, path: Path) -> Any:
    try:
        config = yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise CorruptCheckpointError(f"invalid YAML ({type(exc).__name__}: {text})", path=path, key=CONFIG,
                                     fix=f"fix or regenerate {CONFIG} (NeMo writes it with OmegaConf.save)") from exc
    _count_values(config, path)
    return {} if config is None else config


def _count_values(config: Any, path: Path) -> None:
    # Aliases make a YAML graph, not a tree: count what flattening would visit, and stop early.
    stack, seen = [config], 0
    while stack:
        value, seen = stack.pop(), seen + 1
        if seen > MAX_CONFIG_VALUES:
            raise UnsafeCheckpointError(f"config expands to more than {MAX_CONFIG_VALUES} values (a YAML alias bomb?)",
                                        path=path, key=CONFIG, fix="write the config without anchors and aliases")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _config_provenance(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scopes = [config] if isinstance(config, dict) else []
    if scopes and isinstance(config.get("model"), dict):
        scopes.append(config["model"])  # a full experiment config nests the model's under "model"
    for scope in scopes:
        for key, name in (("target", "target"), ("_target_", "target"), ("nemo_version", "nemo_version")):
            if name not in out and isinstance(scope.get(key), str):
                out[name] = scope[key]
    return out


# ---------------------------------------------------------------------------------------------
# Writing

CONFIG_KEY = "nemo.model_config"  # metadata key carrying a .nemo's model_config.yaml through other formats
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


def _copy_into(out: IO[bytes], name: str, size: int, reader: IO[bytes], source: Path) -> None:
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
    text = extra.pop(CONFIG_KEY, None)
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
        torch_zip.write_torch_zip(body, out, structure=structure, metadata=extra)
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
                    _copy_into(out, name, size, reader, source)
        out.write(b"\0" * (2 * _BLOCK))  # end of archive
