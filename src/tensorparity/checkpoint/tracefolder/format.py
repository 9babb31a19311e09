"""The trace format: a folder of safetensors shards plus a manifest written last.

Layout::

    TRACE/
      shard-00000.safetensors   tensors keyed by record key (module/call/kind[/path]), ~256 MB each
      shard-00001.safetensors
      manifest.json             written LAST and atomically: schema, mode, provenance, shards
                                (file, size, checksum), records (each stored one names its shard)
    TRACE/rank-0/ ... rank-1/   under torchrun: one such folder per rank

Tensors stream to disk from a background thread through blocks bounded in bytes (the producer
waits when they are full), so disk writes overlap compute and capture cannot run out of memory
(:mod:`.writer`: how, and why with ``O_DIRECT``). A shard is a safetensors file whose tensors lie
in the order they arrived, its header padded with spaces to a reserved room.
The manifest goes to a temporary file that is renamed over ``manifest.json``; it records every
shard's size and checksum. A folder with shards and no manifest is therefore a capture that did
not finish, and is refused as such. Nothing is fsynced by default (``fsync=True`` of the writer
and of :func:`write_manifest` does): a shard that a power loss tore under the manifest fails its
size check at open or its checksum at first load, and a manifest it tore is not JSON, so a trace
is never read as complete when it is not — and a capture does not wait for the disk (fsync was
half the writer's time, and the manifest's fsyncs most of a capture's exit on a busy disk).
Nothing in a trace is pickled.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from tensorparity._atomic import atomic_output, fsync_dir
from tensorparity.checkpoint.safetensors import DTYPES
from tensorparity.checkpoint.tracefolder.records import SCHEMA, TraceRecord
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["CAPTURING", "DATA_FIRST", "DIGESTS", "MANIFEST", "MODES", "RECAPTURE", "STORABLE", "ShardInfo",
           "TraceError", "build_manifest", "file_digest", "rank_folders", "read_manifest", "schema_major",
           "write_manifest"]

CAPTURING = ".capturing"  # written when a capture starts, removed once its manifest is written

MANIFEST = "manifest.json"
MODES = ("full", "stats", "window")
SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")
RANK_RE = re.compile(r"rank-(\d+)")
# What safetensors writes and tensorparity reads back.
STORABLE = frozenset(getattr(torch, name) for name in DTYPES.values())
MAX_MANIFEST = 2_000_000_000
RECAPTURE = "capture the trace again (tensorparity capture, or tensorparity.trace.capture(..., out=...))"


class TraceError(CorruptCheckpointError):
    """A trace folder is incomplete, malformed, of an unknown schema, or its shards do not match."""


def schema_major(schema: Any) -> int | None:
    """The major version of a ``tensorparity.trace/<major>[.<minor>]`` schema string, else None.

    Example:
        >>> schema_major("tensorparity.trace/1.2"), schema_major("something/1")
        (1, None)
    """
    if not isinstance(schema, str):
        return None
    m = re.fullmatch(r"tensorparity\.trace/(\d+)(?:\.\d+)?", schema)
    return int(m.group(1)) if m else None


# The first is written: xxh3-128 of a shard's data region, then of its header (the order the
# writer writes them in: see .writer); older traces carry the others, of the file in file order.
DATA_FIRST = "xxh3_128_data_first"
DIGESTS = (DATA_FIRST, "xxh3_128", "sha256", "blake2b")
_DIGEST_CHUNK = 64 << 20


def file_digest(path: Path, algorithm: str = DIGESTS[0], *, mapped: Any = None) -> str:
    """A shard's checksum: xxh3-128 of its data region then its header by default (see
    :data:`DATA_FIRST`), xxh3-128, sha256 or blake2b-256 of the file for older traces.

    The checksum guards against corruption (a truncated copy, a flipped bit), not an adversary,
    so it is the fastest good one: xxh3 hashes at memory speed (~20 GB/s here), where sha256 made
    checking a trace cost more than comparing it. The file is mapped, not copied into Python, and
    the hashers release the GIL, so shards are checked while other threads compare. ``mapped``:
    the reader's :class:`~tensorparity.checkpoint._mapped.MappedFile` of the file, hashed through
    (its pages then stay mapped for the tensors read next) instead of a mapping of its own.
    """
    h: Any = (xxhash.xxh3_128() if algorithm in ("xxh3_128", DATA_FIRST) else hashlib.sha256()
              if algorithm == "sha256" else hashlib.blake2b(digest_size=32))

    def feed(size: int, view: Callable[[int, int], Any]) -> str:
        ranges = [(0, size)]
        if algorithm == DATA_FIRST and size >= 8:
            head = min(size, 8 + int.from_bytes(bytes(view(0, 8)), "little"))
            ranges = [(head, size), (0, head)]
        for lo, hi in ranges:
            for start in range(lo, hi, _DIGEST_CHUNK):
                h.update(view(start, min(_DIGEST_CHUNK, hi - start)))
        return h.hexdigest()  # type: ignore[no-any-return]

    if mapped is not None:
        return feed(os.path.getsize(path), mapped.view)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()  # type: ignore[no-any-return]
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped_file, memoryview(mapped_file) as whole:
            return feed(len(whole), lambda start, n: whole[start:start + n])


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest lists it."""

    file: str
    bytes: int
    digest: str
    tensors: int
    algorithm: str = DIGESTS[0]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "bytes": self.bytes, self.algorithm: self.digest, "tensors": self.tensors}


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Provenance as strict JSON: non-finite floats and unknown objects become strings."""
    if isinstance(value, dict) and depth < 20:
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth < 20:
        return [_jsonable(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    return str(value)


def build_manifest(records: list[TraceRecord], provenance: dict[str, Any], mode: str,
                   shards: list[ShardInfo], shard_of: dict[str, str],
                   same_as: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest as a JSON-ready dict; every stored record names the shard that holds it, and
    a record whose tensor was stored once already (the same tensor recorded again, unchanged: a
    container's output is its last child's) names the record that holds it (``same_as``)."""
    rows = []
    same_as = same_as or {}
    for record in records:
        row = record.to_dict()
        if record.stored:
            row["shard"] = shard_of[record.key]
            if record.key in same_as:
                row["same_as"] = same_as[record.key]
        rows.append(row)
    return {"schema": SCHEMA, "mode": mode, "provenance": _jsonable(provenance),
            "shards": [s.to_dict() for s in shards], "records": rows}


_ROW = json.JSONEncoder(allow_nan=False, default=str)


def write_manifest(folder: Path, manifest: dict[str, Any], *, fsync: bool = False) -> Path:
    """Write ``manifest.json`` atomically (:func:`~tensorparity._atomic.atomic_output`: temporary
    file beside it, renamed over it), then drop the capturing marker; with ``fsync`` the file and
    the folder are fsynced too, so that the manifest itself survives a power cut.

    Not fsynced by default, as the shards are not: the trace is whole only once every file is on
    disk, and a power cut before that leaves no manifest, an empty or torn one (refused as not
    JSON) or shards torn under it (refused by their size or checksum), never a trace that looks
    complete. An fsync waits for the disk's journal: 3-100 ms, most of a capture's exit on a
    busy disk."""
    path = Path(folder) / MANIFEST
    # Readable at the top, one line per record below (a manifest may list 100,000 records).
    head = {k: v for k, v in manifest.items() if k != "records"}
    encode = _ROW.encode  # one encoder for every row: json.dumps with options makes one per call
    rows = [encode(r) for r in manifest.get("records", [])]
    text = json.dumps(head, indent=1, allow_nan=False, default=str)[:-2]
    text += ',\n "records": [' + ("\n  " + ",\n  ".join(rows) + "\n ]" if rows else "]") + "\n}\n"
    with atomic_output(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    (path.parent / CAPTURING).unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)
    return path


def rank_folders(path: Path) -> dict[int, Path]:
    """The ``rank-<r>`` trace folders inside ``path`` (a multi-process capture), by rank."""
    try:
        names = os.listdir(path)
    except OSError:
        return {}
    out = {int(m.group(1)): path / n for n in names if (m := RANK_RE.fullmatch(n)) and (path / n).is_dir()}
    return dict(sorted(out.items()))


def _check_schema(schema: Any, path: Path) -> None:
    major = schema_major(schema)
    want = schema_major(SCHEMA)
    if major is None:
        raise TraceError(f"{MANIFEST} is not a tensorparity trace manifest (schema {schema!r})", path=path,
                         fix="pass a folder written by tensorparity capture")
    if major > want:  # type: ignore[operator]
        raise TraceError(f"trace schema {schema} is newer than this tensorparity reads ({SCHEMA})", path=path,
                         fix="upgrade tensorparity (pip install -U tensorparity) in this environment, or capture "
                             "the trace with the version installed here")
    if major != want:
        raise TraceError(f"trace schema {schema} is older than this tensorparity reads ({SCHEMA})", path=path,
                         fix=RECAPTURE + " with this tensorparity version")


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json``: schema (major version must match; extra fields of a
    newer minor version are ignored), mode, shards and records (as :class:`TraceRecord`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        names = os.listdir(folder) if folder.is_dir() else []
        shards = [n for n in names if SHARD_RE.fullmatch(n)]
        if shards or CAPTURING in names or any(n.startswith((f".{MANIFEST}.", MANIFEST + ".tmp")) for n in names):
            raise TraceError(f"the capture did not finish: {len(shards)} shard file(s) but no {MANIFEST}",
                             path=folder, fix=RECAPTURE + "; a trace is complete only once capture has "
                                                           "exited and written its manifest")
        raise TraceError(f"not a trace: no {MANIFEST}", path=folder,
                         fix="pass a folder written by tensorparity.trace.capture or `tensorparity capture`")
    if path.is_symlink():
        raise UnsafeCheckpointError(f"{MANIFEST} is a symbolic link", path=folder, fix="copy the trace folder itself")
    if path.stat().st_size > MAX_MANIFEST:
        raise UnsafeCheckpointError(f"{MANIFEST} is larger than {MAX_MANIFEST} bytes", path=path,
                                    fix="capture fewer records (include/exclude, stats mode)")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{MANIFEST} is not valid JSON ({exc})", path=folder, fix=RECAPTURE) from exc
    if not isinstance(data, dict):
        raise TraceError(f"{MANIFEST} is not a JSON object", path=folder, fix=RECAPTURE)
    _check_schema(data.get("schema"), folder)
    if data.get("mode") not in MODES:
        raise TraceError(f"unknown mode {data.get('mode')!r} (expected one of {', '.join(MODES)})",
                         path=folder, key="mode", fix=RECAPTURE)
    provenance, shards, rows = data.get("provenance", {}), data.get("shards"), data.get("records")
    if not isinstance(provenance, dict) or not isinstance(shards, list) or not isinstance(rows, list):
        raise TraceError(f"{MANIFEST} needs 'provenance' (object), 'shards' and 'records' (lists)", path=folder,
                         fix=RECAPTURE)
    infos: list[ShardInfo] = []
    for i, s in enumerate(shards):
        try:
            algorithm = next(a for a in (*DIGESTS, "") if not a or a in s)
            info = ShardInfo(str(s["file"]), int(s["bytes"]), str(s[algorithm]), int(s.get("tensors", 0)), algorithm)
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"shard entry {i} is malformed ({type(exc).__name__}: {exc})", path=folder,
                             key="shards", fix=RECAPTURE) from exc
        if not SHARD_RE.fullmatch(info.file):
            raise UnsafeCheckpointError(f"shard name {info.file!r} is not shard-NNNNN.safetensors", path=folder,
                                        key="shards", fix="the manifest was edited or forged; capture again")
        infos.append(info)
    names = {s.file for s in infos}
    records: list[TraceRecord] = []
    shard_of: dict[str, str] = {}
    same_as: dict[str, str] = {}
    stored: dict[str, TraceRecord] = {}
    last = -1
    for i, row in enumerate(rows):
        try:
            record = TraceRecord.from_dict(row)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TraceError(f"record {i} is malformed ({type(exc).__name__}: {exc})", path=folder,
                             key="records", fix=RECAPTURE) from exc
        if record.index <= last:
            raise TraceError(f"record {i} has execution index {record.index} after {last}", path=folder,
                             key=record.key, fix=RECAPTURE)
        last = record.index
        if record.stored:
            shard = row.get("shard")
            if shard not in names:
                raise TraceError(f"record names shard {shard!r}, which the manifest does not list", path=folder,
                                 key=record.key, fix=RECAPTURE)
            shard_of[record.key] = shard
            if "same_as" in row:
                same_as[record.key] = row["same_as"]
            else:
                stored[record.key] = record
        records.append(record)
    for record in records:
        if record.key in same_as:
            _check_same_as(same_as[record.key], record, stored, shard_of, folder)
    return {"schema": data["schema"], "mode": data["mode"], "provenance": provenance, "shards": infos,
            "records": records, "shard_of": shard_of, "same_as": same_as}


def _check_same_as(target: Any, record: TraceRecord, stored: dict[str, TraceRecord], shard_of: dict[str, str],
                   folder: Path) -> None:
    """A ``same_as`` row names a record stored under its own key, in the same shard, of the same
    dtype and shape."""
    other = stored.get(target) if isinstance(target, str) else None
    if other is None:
        raise TraceError(f"same_as names {target!r}, which is not a tensor stored under its own key", path=folder,
                         key=record.key, fix=RECAPTURE)
    shard = shard_of[record.key]
    if shard_of[target] != shard or other.dtype != record.dtype or tuple(other.shape) != tuple(record.shape):
        raise TraceError(f"same_as names {target!r}, which holds {other.dtype}{list(other.shape)} in "
                         f"{shard_of[target]}, not {record.dtype}{list(record.shape)} in {shard}", path=folder,
                         key=record.key, fix=RECAPTURE)
