"""The formats tensorparity knows, one small object each (registered by :mod:`.format_registry`).

Each object recognises its files from a :class:`~.format_registry.Probe` with no import beyond
this module, and imports its reader or writer module on first use: opening a safetensors file
loads neither the NeMo reader (yaml) nor the trace reader, and nothing loads
``torch.distributed.checkpoint`` (0.4 s) until a DCP folder is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tensorparity.errors import UsageError

if TYPE_CHECKING:
    from tensorparity.checkpoint.format_registry import Format, Probe
    from tensorparity.checkpoint.tree import Checkpoint

__all__ = ["BUILTIN", "DEFAULT_SHARD_SIZE", "DETECTION_ORDER", "listing"]

DEFAULT_SHARD_SIZE = 5 * 10**9  # Hugging Face's default for save_pretrained
_INDEXES = (".safetensors.index.json", ".bin.index.json")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_LIST = 5  # keys named in an error before "..."


def listing(keys: list[str]) -> str:
    """The first keys of a list, then how many more: ``a, b, c, d, e and 3 more``."""
    shown = ", ".join(keys[:_LIST])
    return shown + (f" and {len(keys) - _LIST} more" if len(keys) > _LIST else "")


# Magic numbers, read from the first bytes of a file.

def _is_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06"


def _is_npz(path: Path) -> bool:
    # numpy.savez names every member "<array>.npy"; torch.save's first member is "<record>/data.pkl".
    # Reading the first local header (30 + name bytes) avoids parsing the central directory twice
    # (the reader that follows parses it, and reports whatever is wrong with it).
    with open(path, "rb") as f:
        head = f.read(30 + 0xFFFF)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return False
    name_len = int.from_bytes(head[26:28], "little")
    return head[30:30 + name_len].endswith(b".npy")


def _is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _is_legacy_torch(head: bytes) -> bool:
    # pickle protocol 2 of torch's magic number: PROTO 2, LONG1 with 10 bytes.
    return head[:3] == b"\x80\x02\x8a" and head[3:4] == b"\x0a"


def _is_file(source: str) -> bool:
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # "<in-memory mapping>" and the like
        return False


def _is_dir(source: str) -> bool:
    try:
        return Path(source).is_dir()
    except (OSError, ValueError):
        return False


def _check_safetensors(ckpt: Checkpoint, dest: Path) -> None:
    from tensorparity.checkpoint.tree import ValueEntry  # lazy: only a write checks; detection costs no torch

    values = [k for k, e in ckpt.items() if isinstance(e, ValueEntry)]
    if values:
        raise UsageError(f"{len(values)} non-tensor value(s) cannot go into safetensors: {listing(values)}",
                         path=dest, fix="convert the weights only (--weights-only / weights_only=True), or "
                                        "write torch or dcp, which keep values")


# Writable formats, in the order they are listed.

class TorchZip:
    """``torch.save``'s zip (Lightning's ``.ckpt`` too); the source's nesting is kept on output."""

    name, detected_as, family, sharded = "torch", "zip", "torch", False
    suffixes, produces = _TORCH_SUFFIXES, ("torch-zip",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and _is_zip(probe.head)  # an npz is asked first

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.torch_zip import read_torch_zip  # lazy: a reader loads on first read

        return read_torch_zip(path)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        return None  # a pickle holds anything a Checkpoint does

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        from tensorparity.checkpoint._rebuild import structure_of  # lazy: a writer loads on first write
        from tensorparity.checkpoint.torch_zip import write_torch_zip  # lazy: the format's module loads on first use

        with open(dest, "wb") as f:
            write_torch_zip(ckpt, f, structure=structure_of(ckpt), metadata=metadata)

    def metadata(self, ckpt: Checkpoint) -> dict[str, str]:
        if "torch_zip_version" not in ckpt.provenance or not _is_file(ckpt.source):
            return {}  # Lightning files too: their reader is this one
        from tensorparity.checkpoint.torch_zip import read_metadata  # lazy: the format's module loads on first use

        return read_metadata(Path(ckpt.source))


class Safetensors:
    """One ``.safetensors`` file: tensors only."""

    name, detected_as, family, sharded = "safetensors", "safetensors", "safetensors", False
    suffixes, produces = (".safetensors",), ("safetensors",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and _is_safetensors(probe.head)

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.safetensors import read_safetensors  # lazy: the format's module loads on first use

        return read_safetensors(path)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        _check_safetensors(ckpt, dest)

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        from tensorparity.checkpoint.safetensors import write_file  # lazy: the format's module loads on first use

        write_file(ckpt, dest, metadata={"format": "pt", **metadata})


class SafetensorsSharded:
    """Hugging Face's sharded layout: a folder of shards and an ``*.index.json`` (or that index
    itself); read with ``.bin`` shards too, written as safetensors."""

    name, detected_as, family, sharded = "safetensors-sharded", "hf-sharded", "safetensors-sharded", True
    suffixes, produces = (), ("hf-sharded-safetensors", "hf-sharded-bin")

    def detect(self, probe: Probe) -> bool:
        if probe.is_dir:
            return any(n.endswith(_INDEXES) for n in probe.names)
        return probe.path.name.endswith(_INDEXES)  # named, not sniffed: the index is JSON

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.hf_sharded import read_sharded  # lazy: the format's module loads on first use

        return read_sharded(path)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        if not any(True for _ in ckpt.tensors()):
            raise UsageError("there are no tensors to shard", path=dest, fix="write torch, safetensors or dcp instead")
        _check_safetensors(ckpt, dest)

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        from tensorparity.checkpoint.hf_sharded import write_sharded  # lazy: the format's module loads on first use

        limit = DEFAULT_SHARD_SIZE if max_shard_size is None else max_shard_size
        write_sharded(ckpt, dest, max_shard_size=limit, metadata=metadata)


class Dcp:
    """A ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``)."""

    name, detected_as, family, sharded = "dcp", "dcp", "dcp", False
    suffixes, produces = (), ("dcp",)

    def detect(self, probe: Probe) -> bool:
        return probe.is_dir and ".metadata" in probe.names

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.dcp import read_dcp  # lazy: the format's module loads on first use

        return read_dcp(path)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        return None  # values are pickled into the folder

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        from tensorparity.checkpoint._rebuild import structure_of  # lazy: a writer loads on first write
        from tensorparity.checkpoint.dcp import write_dcp  # lazy: the format's module loads on first use

        write_dcp(ckpt, dest, structure=structure_of(ckpt), metadata=metadata)

    def metadata(self, ckpt: Checkpoint) -> dict[str, str]:
        if ckpt.format != "dcp" or not _is_dir(ckpt.source):
            return {}
        from tensorparity.checkpoint.dcp import read_dcp_metadata  # lazy: the format's module loads on first use

        return read_dcp_metadata(Path(ckpt.source))


class NemoArchive:
    """A ``.nemo`` archive (tar or tar.gz): config, weights, artifacts."""

    name, detected_as, family, sharded = "nemo", "nemo", "nemo", False
    suffixes, produces = (".nemo",), ("nemo",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and (probe.head[:2] == b"\x1f\x8b" or _is_tar(probe.head))

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.nemo import read_nemo  # lazy: yaml and tarfile load when a .nemo is read

        return read_nemo(path)

    def check(self, ckpt: Checkpoint, dest: Path) -> None:
        return None  # the weights are a torch zip inside; the config is checked as it is written

    def write(self, ckpt: Checkpoint, dest: Path, *, source: Checkpoint, max_shard_size: int | None,
              metadata: Mapping[str, str]) -> None:
        from tensorparity.checkpoint._rebuild import structure_of  # lazy: a writer loads on first write
        from tensorparity.checkpoint.nemo import write_nemo  # lazy: yaml and tarfile load when a .nemo is used

        write_nemo(source, ckpt, dest, structure=structure_of(ckpt), metadata=metadata)

    def metadata(self, ckpt: Checkpoint) -> dict[str, str]:
        if ckpt.format != "nemo" or not (_is_file(ckpt.source) or _is_dir(ckpt.source)):
            return {}
        from tensorparity.checkpoint.layout import RECORD_KEY, RECORD_METADATA_KEY  # lazy: detection imports no reader
        from tensorparity.checkpoint.nemo import (  # lazy: yaml and tarfile load when a .nemo is used
            CONFIG_KEY,
            read_config,
        )
        from tensorparity.checkpoint.tree import ValueEntry  # lazy: detection imports no reader

        out: dict[str, str] = {}
        config = read_config(Path(ckpt.source))
        if config is not None:
            out[CONFIG_KEY] = config.decode("utf-8", "replace")
        record = ckpt.get(RECORD_KEY)
        if isinstance(record, ValueEntry) and isinstance(record.value, str):
            out[RECORD_METADATA_KEY] = record.value  # the record member travels as the metadata string
        return out


# Formats tensorparity reads only.

class Npz:
    """``numpy.savez`` archives: a zip of ``.npy`` members."""

    name, detected_as, family = "npz", "zip", "torch"
    suffixes, produces = (".npz",), ("npz",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and _is_zip(probe.head) and _is_npz(probe.path)

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.npz import read_npz  # lazy: a reader loads on first read

        return read_npz(path)


class TorchLegacy:
    """``torch.save`` before the zip format (``_use_new_zipfile_serialization=False``)."""

    name, detected_as, family = "torch-legacy", "torch-legacy", "torch"
    suffixes, produces = _TORCH_SUFFIXES, ("torch-legacy",)

    def detect(self, probe: Probe) -> bool:
        return not probe.is_dir and _is_legacy_torch(probe.head)

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.torch_legacy import read_legacy  # lazy: a reader loads on first read

        return read_legacy(path)


class NemoFolder:
    """An extracted ``.nemo``: a folder holding ``model_config.yaml``."""

    name, detected_as, family = "nemo-folder", "nemo-folder", "nemo"
    suffixes, produces = (), ("nemo",)

    def detect(self, probe: Probe) -> bool:
        return probe.is_dir and "model_config.yaml" in probe.names

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.nemo import read_nemo  # lazy: yaml and tarfile load when a .nemo is read

        return read_nemo(path)


class TraceFolder:
    """A trace folder written by ``tensorparity capture``; opened as its records and weights."""

    name, detected_as, family = "trace", "trace", "safetensors"
    suffixes, produces = (), ("trace",)

    def detect(self, probe: Probe) -> bool:
        if not probe.is_dir:
            return False
        # Asked last among folders: only a folder no other format claims loads the trace reader.
        from tensorparity.checkpoint.tracefolder.as_checkpoint import is_trace_dir  # lazy: 0.2 s of imports

        return is_trace_dir(probe.path)

    def read(self, path: Path) -> Checkpoint:
        from tensorparity.checkpoint.tracefolder.as_checkpoint import read_trace_dir  # lazy: 0.2 s of imports

        return read_trace_dir(path)


BUILTIN: tuple[Format, ...] = (TorchZip(), Safetensors(), SafetensorsSharded(), Dcp(), NemoArchive(),
                               Npz(), TorchLegacy(), NemoFolder(), TraceFolder())
# Folders: DCP's .metadata wins over an index beside it, an index over a model_config.yaml, and a
# trace is looked for last (its reader is the costliest to load). Files: an index is named, not
# sniffed; an npz is a zip, so it is asked before torch; then the magic numbers, a tar's last: its
# "ustar" sits at byte 257, where a safetensors header's JSON may hold those letters too, while a
# tar member name never starts with a safetensors length and "{" or with torch's pickle magic.
DETECTION_ORDER = ("dcp", "safetensors-sharded", "nemo-folder", "trace", "npz", "torch", "safetensors",
                   "torch-legacy", "nemo")
