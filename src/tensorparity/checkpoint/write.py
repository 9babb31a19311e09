"""Write a :class:`Checkpoint` in any supported format, streaming: one tensor in memory at a time.

Formats (:data:`FORMATS`; each a :class:`~tensorparity.checkpoint.WritableFormat` of the registry
in :mod:`tensorparity.checkpoint.format_registry`, which checks and writes it):

``torch``                torch zip, as ``torch.save`` writes it; the source's nesting is kept
``safetensors``          one ``.safetensors`` file
``safetensors-sharded``  a folder of shards plus ``model.safetensors.index.json`` (Hugging Face)
``dcp``                  a ``torch.distributed.checkpoint`` folder (no process group needed)
``nemo``                 a ``.nemo`` tar: ``model_config.yaml`` + ``model_weights.ckpt`` + artifacts

:func:`write_checkpoint` is not atomic by itself; wrap it in
:func:`tensorparity._atomic.atomic_output`, as :func:`tensorparity.convert` does.

Everything is validated before the first byte is written (values that a format cannot hold,
objects a pickle named but that were never executed, meta tensors without data), and every
problem is named at once.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from tensorparity.checkpoint._builtin_formats import listing as _listing
from tensorparity.checkpoint._rebuild import structure_of
from tensorparity.checkpoint.format_registry import WritableFormat, format_names, formats, writable_formats
from tensorparity.checkpoint.nemo import CONFIG_KEY as NEMO_CONFIG_KEY
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.checkpoint.tree import Checkpoint, ValueEntry
from tensorparity.errors import UsageError

__all__ = ["FORMATS", "NEMO_CONFIG_KEY", "check_writable", "family", "format_for_path", "parse_size", "payload",
           "source_metadata", "structure_of", "write_checkpoint"]

# The registry's writable formats as registered at import (format_names(writable=True) also lists
# any registered since).
FORMATS = format_names(writable=True)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)


def _writer(name: str) -> WritableFormat | None:
    return next((f for f in writable_formats() if f.name == name), None)


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
    named = next((f.name for f in writable_formats() if suffix and suffix in f.suffixes), None)
    if named is None and not suffix and max_shard_size is not None:
        named = next((f.name for f in writable_formats() if f.sharded), None)
    return named


def family(ckpt: Checkpoint) -> str:
    """The output format of a checkpoint's own kind: the family of the format whose reader gives
    ``ckpt.format``; anything else (``lightning``, a live module) is pickled objects: ``torch``.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> family(tp_open({"w": torch.ones(1)}))
        'torch'
    """
    return next((f.family for f in formats() if ckpt.format in f.produces), "torch")


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


def check_writable(ckpt: Checkpoint, fmt: str, dest: Path) -> None:
    """Refuse, before writing anything, what ``fmt`` cannot hold; every offending key at once."""
    writer = _writer(fmt)
    if writer is None:
        raise UsageError(f"unknown output format {fmt!r}", path=dest,
                         fix=f"use one of {', '.join(format_names(writable=True))}")
    not_run = [k for k, e in ckpt.items() if isinstance(e, ValueEntry) and isinstance(e.value, Placeholder)]
    if not_run:
        raise UsageError(f"{len(not_run)} object(s) the pickle named were never executed and cannot be written "
                         f"back: {_listing(not_run)}", path=dest,
                         fix="drop those keys (a migration or mapping `ignore`), or convert the weights only")
    meta = [e.key for e in ckpt.tensors() if e.location in ("meta (no data)", "in memory on meta")]
    if meta:
        raise UsageError(f"{len(meta)} meta tensor(s) have a shape but no data: {_listing(meta)}", path=dest,
                         fix="materialise them before saving, or drop those keys")
    writer.check(ckpt, dest)  # what this format cannot hold


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
    for fmt in writable_formats():  # each format knows what its files carry besides a header
        read = getattr(fmt, "metadata", None)
        if read is not None:
            out.update(read(ckpt))
    return out


def write_checkpoint(ckpt: Checkpoint, dest: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
                     max_shard_size: int | str | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Stream every entry of ``ckpt`` to ``dest``, one tensor in memory at a time.

    Not atomic by itself: write into the path :func:`tensorparity._atomic.atomic_output` yields.
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
    writer = _writer(fmt)
    if max_shard_size is not None and (writer is None or not writer.sharded):
        sharded = " or ".join(f.name for f in writable_formats() if f.sharded)
        raise UsageError(f"max_shard_size applies to {sharded} output, not {fmt}", path=dest,
                         fix=f"drop --max-shard-size, or pass --format {sharded}")
    body = _rekeyed(payload(ckpt))
    check_writable(body, fmt, dest)
    assert writer is not None, "check_writable refuses an unknown format"
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    writer.write(body, dest, source=ckpt, max_shard_size=limit, metadata=meta)
