"""Write a :class:`Checkpoint` in any supported format, streaming: one tensor in memory at a time.

Formats (:data:`FORMATS`):

``torch``                torch zip, as ``torch.save`` writes it; the source's nesting is kept
``safetensors``          one ``.safetensors`` file
``safetensors-sharded``  a folder of shards plus ``model.safetensors.index.json`` (Hugging Face)
``dcp``                  a ``torch.distributed.checkpoint`` folder (no process group needed)
``nemo``                 a ``.nemo`` tar: ``model_config.yaml`` + ``model_weights.ckpt`` + artifacts

:func:`write_checkpoint` is not atomic by itself; wrap it in
:func:`tensorparity._output.atomic_output`, as :func:`tensorparity.convert` does.

Everything is validated before the first byte is written (values that a format cannot hold,
objects a pickle named but that were never executed, meta tensors without data), and every
problem is named at once.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tensorparity.checkpoint import Checkpoint, ValueEntry, _safetensors_write
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint._dcp_write import read_dcp_metadata, write_dcp
from tensorparity.checkpoint._nemo_write import read_config, write_nemo
from tensorparity.checkpoint._torch_zip_write import METADATA_RECORD, write_torch_zip
from tensorparity.checkpoint.layout import RECORD_KEY
from tensorparity.checkpoint.layout import RECORD_METADATA_KEY as METADATA_KEY
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.errors import TensorParityError, UsageError

__all__ = ["FORMATS", "NEMO_CONFIG_KEY", "check_writable", "family", "format_for_path", "parse_size", "payload",
           "source_metadata", "structure_of", "write_checkpoint"]

FORMATS = ("torch", "safetensors", "safetensors-sharded", "dcp", "nemo")
NEMO_CONFIG_KEY = "nemo.model_config"  # metadata key carrying a .nemo's model_config.yaml through other formats
DEFAULT_SHARD_SIZE = 5 * 10**9  # Hugging Face's default for save_pretrained

_FAMILY = {
    "safetensors": "safetensors", "hf-sharded-safetensors": "safetensors-sharded",
    "hf-sharded-bin": "safetensors-sharded", "dcp": "dcp", "nemo": "nemo", "trace": "safetensors",
}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)
_LIST = 5  # keys named in an error before "..."


def parse_size(text: str | int) -> int:
    """Parse a size like ``500MB`` (10^6 bytes), ``2GiB`` (2^30) or ``1000`` (bytes).

    Example:
        >>> parse_size("500MB"), parse_size("2GiB"), parse_size(1024)
        (500000000, 2147483648, 1024)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise UsageError(f"size {text!r} is not a number of bytes with an optional unit",
                             fix="write e.g. 500MB, 2GB, 1GiB or 1000000")
        value = math.floor(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise UsageError(f"size {text!r} must be more than 0 bytes", fix="write e.g. 500MB")
    return value


def format_for_path(dest: Path, *, max_shard_size: int | None = None) -> str | None:
    """The format a destination's name implies, or ``None`` when it does not say.

    Example:
        >>> format_for_path(Path("m.safetensors")), format_for_path(Path("m.ckpt")), format_for_path(Path("out"))
        ('safetensors', 'torch', None)
    """
    suffix = dest.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix == ".nemo":
        return "nemo"
    if not suffix and max_shard_size is not None:
        return "safetensors-sharded"
    return None


def family(ckpt: Checkpoint) -> str:
    """The output format of a checkpoint's own kind (``lightning`` -> ``torch``)."""
    return _FAMILY.get(ckpt.format, "torch")


def payload(ckpt: Checkpoint) -> Checkpoint:
    """The entries a writer writes: a ``.nemo``'s config, artifact listing and record travel apart.

    A ``.nemo`` checkpoint lists its config as ``model_config.*`` values, its artifacts as
    ``artifacts.*`` and tensorparity's migration record as ``tensorparity_migrations``; they are
    not weights, and are carried as the config file and archive members.
    """
    if ckpt.format != "nemo":
        return ckpt
    keep = {k: e for k, e in ckpt.items() if ckpt.section_of(k) not in ("config", "artifacts", "records")}
    return Checkpoint(source=ckpt.source, format=ckpt.format, entries=keep, sections=ckpt.sections,
                      provenance=ckpt.provenance, placeholders=ckpt.placeholders, notes=ckpt.notes,
                      default_section=ckpt.default_section, structure=ckpt.structure)


def _rekeyed(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with every entry's own key equal to its key in the mapping (a hand-built
    checkpoint may file an entry under a new name without renaming it)."""
    if all(e.key == k for k, e in ckpt.items()):
        return ckpt
    entries = {k: e if e.key == k else replace(e, key=k) for k, e in ckpt.items()}
    return Checkpoint(source=ckpt.source, format=ckpt.format, entries=entries, sections=ckpt.sections,
                      provenance=ckpt.provenance, placeholders=ckpt.placeholders, notes=ckpt.notes,
                      default_section=ckpt.default_section, structure=ckpt.structure)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST])
    return shown + (f" and {len(keys) - _LIST} more" if len(keys) > _LIST else "")


def check_writable(ckpt: Checkpoint, fmt: str, dest: Path) -> None:
    """Refuse, before writing anything, what ``fmt`` cannot hold; every offending key at once."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r}", path=dest, fix=f"use one of {', '.join(FORMATS)}")
    not_run = [k for k, e in ckpt.items() if isinstance(e, ValueEntry) and isinstance(e.value, Placeholder)]
    if not_run:
        raise UsageError(f"{len(not_run)} object(s) the pickle named were never executed and cannot be written "
                         f"back: {_listing(not_run)}", path=dest,
                         fix="drop those keys (a migration or mapping `ignore`), or convert the weights only")
    meta = [e.key for e in ckpt.tensors() if e.location in ("meta (no data)", "in memory on meta")]
    if meta:
        raise UsageError(f"{len(meta)} meta tensor(s) have a shape but no data: {_listing(meta)}", path=dest,
                         fix="materialise them before saving, or drop those keys")
    if fmt == "safetensors-sharded" and not any(True for _ in ckpt.tensors()):
        raise UsageError("there are no tensors to shard", path=dest, fix="write torch, safetensors or dcp instead")
    if fmt.startswith("safetensors"):
        values = [k for k, e in ckpt.items() if isinstance(e, ValueEntry)]
        if values:
            raise UsageError(f"{len(values)} non-tensor value(s) cannot go into safetensors: {_listing(values)}",
                             path=dest, fix="convert the weights only (--weights-only / weights_only=True), or "
                                            "write torch or dcp, which keep values")


def source_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """String metadata the source carries: a safetensors header's, an index's, a torch zip's
    tensorparity record, a DCP folder's, and a ``.nemo``'s config (as ``nemo.model_config``).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from tensorparity import open as tp_open
        >>> p = tempfile.mkdtemp() + "/w.safetensors"; save_file({"w": torch.ones(1)}, p, {"note": "hi"})
        >>> source_metadata(tp_open(p))
        {'note': 'hi'}
    """
    found = ckpt.provenance.get("metadata")
    out = {str(k): str(v) for k, v in found.items()} if isinstance(found, Mapping) else {}
    path = Path(ckpt.source)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError):  # "<in-memory mapping>" and the like
        return out
    if ckpt.format == "nemo":
        config = read_config(path)
        if config is not None:
            out[NEMO_CONFIG_KEY] = config.decode("utf-8", "replace")
        record = ckpt.get(RECORD_KEY)
        if isinstance(record, ValueEntry) and isinstance(record.value, str):
            out[METADATA_KEY] = record.value  # the record member travels as the metadata string
    elif is_dir and ckpt.format == "dcp":
        out.update(read_dcp_metadata(path))
    elif is_file and "torch_zip_version" in ckpt.provenance:
        out.update(_zip_metadata(path))
    return out


def _zip_metadata(path: Path) -> dict[str, str]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/" + METADATA_RECORD)), None)
            if name is None or zf.getinfo(name).file_size > 16 << 20:
                return {}
            data = json.loads(zf.read(name))
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def structure_of(ckpt: Checkpoint) -> Any:
    """The nested structure to write ``ckpt`` in: its own, or its source file's, or ``None`` (flat).

    A checkpoint built by hand (a migration's result) may carry no structure; when its source is
    a file that tensorparity reads as a nested object, that file's structure is the template.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> structure_of(tp_open({"model": {"w": torch.ones(1)}})).keys()
        dict_keys(['model'])
    """
    if ckpt.structure is not None:
        return ckpt.structure
    path = Path(ckpt.source)
    try:
        readable = path.exists()
    except (OSError, ValueError):
        return None
    if not readable:
        return None
    try:
        with open_checkpoint(path) as again:
            return again.structure
    except TensorParityError:
        return None


def write_checkpoint(ckpt: Checkpoint, dest: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
                     max_shard_size: int | str | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Stream every entry of ``ckpt`` to ``dest``, one tensor in memory at a time.

    Not atomic by itself: write into the path :func:`tensorparity._output.atomic_output` yields.
    Peak memory is about the largest tensor (DCP: see ``docs/convert.md``). For torch output
    the source's nesting is kept (Lightning sections, optimizer state lists, int keys, dicts
    whose keys hold dots); a key the source did not have (renamed by a mapping, added by a
    migration) goes into the deepest dict whose path prefixes it, e.g. a Lightning
    ``state_dict``. Torch output stores tensors that were the same bytes of the source file
    (tied weights) once, tied; other shared storage, and every tie in the other formats, is
    written as separate copies.

    Args:
        ckpt: what to write; its tensors are loaded one by one.
        dest: a file (``torch``, ``safetensors``, ``nemo``) or a folder to create
            (``safetensors-sharded``, ``dcp``).
        format: one of :data:`FORMATS`; default: the family of ``ckpt.format``.
        max_shard_size: bytes per shard (``"500MB"`` style accepted) for ``safetensors-sharded``.
        metadata: strings to record: the safetensors header, the shard index, a record inside a
            torch zip (``.data/tensorparity_metadata.json``), a DCP folder's
            ``tensorparity_metadata.json``. ``nemo.model_config`` holds a ``.nemo``'s config.

    Raises:
        UsageError: the format cannot hold something in ``ckpt`` (non-tensor values in
            safetensors, objects never executed, meta tensors); every offending key named.
        OSError: the disk is full or not writable (callers turn it into a one-line error).

    Example:
        >>> import tempfile, torch, tensorparity
        >>> out = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> write_checkpoint(tensorparity.open({"w": torch.arange(3.0)}), out, format="safetensors")
        >>> tensorparity.open(out)["w"].load()
        tensor([0., 1., 2.])
    """
    dest = Path(dest)
    fmt = format or family(ckpt)
    if max_shard_size is not None and fmt != "safetensors-sharded":
        raise UsageError(f"max_shard_size applies to safetensors-sharded output, not {fmt}", path=dest,
                         fix="drop --max-shard-size, or pass --format safetensors-sharded")
    body = _rekeyed(payload(ckpt))
    check_writable(body, fmt, dest)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "torch":
        with open(dest, "wb") as f:
            write_torch_zip(body, f, structure=structure_of(body), metadata=meta)
    elif fmt == "safetensors":
        _safetensors_write.write_file(body, dest, metadata={"format": "pt", **meta})
    elif fmt == "safetensors-sharded":
        limit = parse_size(max_shard_size) if max_shard_size is not None else DEFAULT_SHARD_SIZE
        _safetensors_write.write_sharded(body, dest, max_shard_size=limit, metadata=meta)
    elif fmt == "dcp":
        write_dcp(body, dest, structure=structure_of(body), metadata=meta)
    else:
        write_nemo(ckpt, body, dest, structure=structure_of(body), metadata=meta)
