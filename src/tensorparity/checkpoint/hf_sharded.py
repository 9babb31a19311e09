"""Sharded Hugging Face checkpoints: an ``*.index.json`` plus the shard files it names.

``save_pretrained`` splits a large state dict into shards (``model-00001-of-00003.safetensors``
or ``pytorch_model-00001-of-00003.bin``) and writes an index::

    {"metadata": {"total_size": 123456}, "weight_map": {"lm_head.weight": "model-00003-of-00003.safetensors", ...}}

Here the index is validated first (names, files, keys), then each shard is read by the existing
readers: safetensors shards through :func:`safetensors.safetensors_tensors`, ``.bin`` shards
(``torch.save`` zips) through :func:`torch_zip.read_object`. Tensors stay lazy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tensorparity.checkpoint import torch_zip
from tensorparity.checkpoint.safetensors import safetensors_tensors, write_entries
from tensorparity.checkpoint.tree import Checkpoint, Entry, LazyTensor, PlaceholderInfo, TensorEntry, flatten
from tensorparity.errors import CorruptCheckpointError, TensorParityError, UnknownFormatError, UnsafeCheckpointError

__all__ = ["INDEX_NAME", "find_index", "read_sharded", "shards", "write_sharded"]

INDEX_NAME = "model.safetensors.index.json"

SAFETENSORS_INDEX = ".safetensors.index.json"
BIN_INDEX = ".bin.index.json"
_PREFERRED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_INDEX = 256 << 20
_INDEX_FIX = "the index is corrupt; download it again or re-save the model with save_pretrained"
_SHOW_KEYS = 5


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f" and {len(keys) - _SHOW_KEYS} more" if len(keys) > _SHOW_KEYS else "")


def find_index(path: Path) -> tuple[Path, list[str]]:
    """Choose the index of a sharded folder (or accept an index file given directly).

    Safetensors indexes are preferred over ``.bin`` ones, and ``model.*`` / ``pytorch_model.*``
    over other names; the returned notes say what was passed over.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for n in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        ...     _ = (d / n).write_text("{}")
        >>> find_index(d)[0].name
        'model.safetensors.index.json'
    """
    if path.is_file():
        return path, []
    names = sorted(n for n in os.listdir(path) if n.endswith((SAFETENSORS_INDEX, BIN_INDEX)))
    if not names:
        raise UnknownFormatError("folder holds no *.safetensors.index.json or *.bin.index.json", path=path,
                                 fix="pass the folder save_pretrained wrote, or a single checkpoint file")
    # Order: safetensors first, then the standard name first, then alphabetical.
    names.sort(key=lambda n: (not n.endswith(SAFETENSORS_INDEX), n not in _PREFERRED, n))
    chosen, others = names[0], names[1:]
    notes = [f"the folder also holds {other}; read the shards of {chosen} instead" for other in others]
    return path / chosen, notes


def _read_index(index: Path) -> tuple[dict[str, str], dict[str, Any]]:
    size = index.stat().st_size
    if size > _MAX_INDEX:
        raise UnsafeCheckpointError(f"index of {size} bytes is larger than the {_MAX_INDEX}-byte limit",
                                    path=index, fix="refusing an implausibly large index file")
    try:
        data = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"index is not valid JSON ({exc})", path=index, fix=_INDEX_FIX) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError('index has no "weight_map" object', path=index, fix=_INDEX_FIX)
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CorruptCheckpointError(f"weight_map maps {len(bad)} key(s) to a non-string: {_listing(bad)}",
                                     path=index, key=bad[0], fix=_INDEX_FIX)
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError('index "metadata" is not an object', path=index, fix=_INDEX_FIX)
    return weight_map, metadata


def _check_shard_name(name: str, index: Path, key: str) -> None:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (not name or "\x00" in name or posix.is_absolute() or windows.is_absolute() or windows.drive
            or name.startswith(("/", "\\")) or ".." in posix.parts or ".." in windows.parts):
        raise UnsafeCheckpointError(
            f"weight_map names the shard {name!r}, which lies outside the checkpoint folder",
            path=index, key=key, fix="refusing a path that could leave the folder; "
                                     "only open checkpoints from sources you trust")


def _shard_objects(shard: Path, binary: bool) -> tuple[dict[str, Any], list[Any]]:
    """The top-level objects of one shard, tensors still lazy, and its closers."""
    if not binary:
        tensors, _, handle = safetensors_tensors(shard)
        return dict(tensors), [handle.close]
    obj, _, closers = torch_zip.read_object(shard)
    if not isinstance(obj, dict):
        for close in closers:
            close()
        raise CorruptCheckpointError(f"shard holds a {type(obj).__name__}, not a state dict", path=shard,
                                     fix="re-save the model with save_pretrained")
    # torch_zip locates a tensor by archive member; say which shard the member is in.
    return {k: replace(v, location=f"{shard} : {v.location}") if isinstance(v, LazyTensor) else v
            for k, v in obj.items()}, closers


def read_sharded(path: Path) -> Checkpoint:
    """Open a sharded Hugging Face checkpoint folder as one :class:`Checkpoint`.

    Args:
        path: the folder holding ``*.safetensors.index.json`` or ``*.bin.index.json`` (or the
            index file itself).

    Returns:
        A :class:`Checkpoint` of format ``hf-sharded-safetensors`` or ``hf-sharded-bin`` with keys in
        index order; tensors found in shards but not in the index are kept and listed in ``notes``.

    Raises:
        CorruptCheckpointError: the index is malformed, names a missing shard, or names a key its
            shard does not hold.
        UnsafeCheckpointError: the index names a shard outside the folder.

    Example:
        >>> import json, tempfile, pathlib, torch
        >>> from safetensors.torch import save_file
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> save_file({"a": torch.ones(2)}, d / "model-00001-of-00002.safetensors")
        >>> save_file({"b": torch.zeros(1)}, d / "model-00002-of-00002.safetensors")
        >>> index = {"metadata": {"total_size": 12}, "weight_map": {
        ...     "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        >>> _ = (d / "model.safetensors.index.json").write_text(json.dumps(index))
        >>> ckpt = read_sharded(d)
        >>> ckpt.format, list(ckpt), ckpt.provenance["shards"]
        ('hf-sharded-safetensors', ['a', 'b'], 2)
    """
    index, notes = find_index(Path(path))
    folder = index.parent
    binary = index.name.endswith(BIN_INDEX)
    weight_map, metadata = _read_index(index)

    # Validate every name and file before reading any shard, and report all missing shards at once.
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        _check_shard_name(shard, index, key)
        by_shard.setdefault(shard, []).append(key)
    missing = [s for s in by_shard if not (folder / s).is_file()]
    if missing:
        keys = [k for s in missing for k in by_shard[s]]
        raise CorruptCheckpointError(
            f"index names {len(missing)} missing shard file(s): {_listing(missing)} "
            f"(holding {_listing(keys)})", path=index, key=keys[0],
            fix=f"copy or download every shard of the checkpoint ({_listing(missing)})")

    closers: list[Any] = []
    contents: dict[str, dict[str, Any]] = {}
    try:
        for shard in by_shard:
            contents[shard], shard_closers = _shard_objects(folder / shard, binary)
            closers.extend(shard_closers)
        absent = [(k, s) for s, keys in by_shard.items() for k in keys if k not in contents[s]]
        if absent:
            shards = sorted({s for _, s in absent})
            raise CorruptCheckpointError(
                f"{len(absent)} key(s) listed in the index are absent from their shard: "
                f"{_listing([k for k, _ in absent])} (in {_listing(shards)})", path=index, key=absent[0][0],
                fix=f"the shard {absent[0][1]} does not match the index; download or re-save the checkpoint")
    except TensorParityError:
        for close in closers:
            close()
        raise

    entries: dict[str, Entry] = {}
    placeholders: list[PlaceholderInfo] = []
    for key, shard in weight_map.items():
        entries.update(flatten(contents[shard][key], prefix=key, placeholders=placeholders))
    extra = [(k, s) for s, objs in contents.items() for k in objs if weight_map.get(k) != s]
    stray = [(k, s) for k, s in extra if k not in weight_map]
    for key, shard in stray:
        entries.update(flatten(contents[shard][key], prefix=key, placeholders=placeholders))
    if stray:
        notes.append(f"{len(stray)} tensor(s) in shards are not listed in {index.name} and were kept: "
                     f"{_listing([f'{k} ({s})' for k, s in stray])}")
    duplicates = [(k, s) for k, s in extra if k in weight_map]
    if duplicates:
        notes.append(f"{len(duplicates)} key(s) also appear in a shard the index does not name for them; "
                     f"the index's shard was used: {_listing([f'{k} ({s})' for k, s in duplicates])}")

    provenance: dict[str, Any] = {"index": index.name, "shards": len(by_shard)}
    if "total_size" in metadata:
        provenance["total_size"] = metadata["total_size"]
    other = {k: v for k, v in metadata.items() if k != "total_size"}
    if other:
        provenance["metadata"] = other
    return Checkpoint(source=str(path), format="hf-sharded-bin" if binary else "hf-sharded-safetensors",
                      entries=entries, provenance=provenance, placeholders=placeholders, notes=notes,
                      closers=closers)


# ---------------------------------------------------------------------------------------------
# Writing

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
        write_entries(part, dest / name, {"format": "pt"})
        weight_map.update({e.key: name for e in part})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries), **dict(metadata or {})},
             "weight_map": weight_map}
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
