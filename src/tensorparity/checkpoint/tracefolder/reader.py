"""The :class:`Trace`: the records of one captured run, in memory or in a trace folder.

A trace is what :func:`tensorparity.trace.capture` produces and what ``Trace.open`` reads back:
records in execution order, provenance, and the stored tensors (loaded lazily from the shards).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tensorparity.checkpoint.safetensors import safetensors_tensors
from tensorparity.checkpoint.tracefolder._assemble import RankShards, assemble_ranks, is_sharded_trace
from tensorparity.checkpoint.tracefolder.format import (
    MANIFEST,
    MODES,
    RECAPTURE,
    ShardInfo,
    TraceError,
    build_manifest,
    file_digest,
    rank_folders,
    read_manifest,
    write_manifest,
)
from tensorparity.checkpoint.tracefolder.records import TensorStats, TraceRecord
from tensorparity.checkpoint.tracefolder.writer import TraceWriter
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError, UsageError

__all__ = ["ShardSet", "Trace", "param_name", "prepare_folder"]


def prepare_folder(path: str | os.PathLike[str]) -> Path:
    """Check that a trace can be written to ``path`` (absent or an empty folder) and create it."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise UsageError("exists and is not a folder", path=folder, fix="choose a new folder for the trace")
        if any(folder.iterdir()):
            raise UsageError("folder is not empty; a trace is never written over other files", path=folder,
                             fix="choose a new folder for the trace, or delete this one")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class ShardSet:
    """The shards of one trace folder, checked against the manifest; tensors read lazily.

    Sizes and headers are checked on opening (a truncated shard is named at once); a shard's
    checksum is checked the first time one of its tensors is read, or by :meth:`verify`. Shards
    just written by this process (``verified``) are opened when first read: a capture's exit
    does not parse back the headers it wrote.
    """

    def __init__(self, folder: Path, shards: list[ShardInfo], shard_of: dict[str, str],
                 records: list[TraceRecord], *, verified: bool = False, same_as: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.infos = {s.file: s for s in shards}
        self.shard_of = shard_of
        self.same_as = same_as or {}  # a record stored once already: the key that holds its tensor
        self._locks = {s.file: threading.Lock() for s in shards}  # one per shard: others load while one is checked
        self._verified: set[str] = set(self.infos) if verified else set()
        self._tensors: dict[str, dict[str, LazyTensor]] = {}
        self._handles: list[Any] = []
        self._mapped: dict[str, Any] = {}  # each shard's one mapping: tensors, byte spans and checksum read it
        self._stored: dict[str, list[TraceRecord]] = {s.file: [] for s in shards}
        for record in (r for r in records if r.stored and r.key not in self.same_as):
            self._stored[shard_of[record.key]].append(record)
        for info in () if verified else shards:  # a fresh capture's shards: opened when first read
            self._open(info.file)

    def _open(self, file: str) -> dict[str, LazyTensor]:
        found = self._tensors.get(file)
        if found is not None:
            return found
        path = self.folder / file
        if path.is_symlink():
            raise UnsafeCheckpointError("shard is a symbolic link", path=path, fix="copy the trace folder itself")
        if not path.is_file():
            raise TraceError("shard file is missing", path=path, fix="copy the whole trace folder, or " + RECAPTURE)
        size = path.stat().st_size
        if size != self.infos[file].bytes:
            raise TraceError(f"shard is {size} bytes but the manifest says {self.infos[file].bytes} (truncated or "
                             f"changed)", path=path, fix="copy the trace folder again, or " + RECAPTURE)
        try:
            tensors, _, handle = safetensors_tensors(path, mapped=True)
        except CorruptCheckpointError as exc:
            raise TraceError(exc.message, path=path, key=exc.key, fix=exc.fix) from exc
        self._handles.append(handle)
        self._mapped[file] = handle
        for record in self._stored[file]:
            held = tensors.get(record.key)
            if held is None:
                raise TraceError("the shard does not hold this record's tensor", path=path, key=record.key,
                                 fix=RECAPTURE)
            dtype = str(held.dtype).removeprefix("torch.")
            if tuple(held.shape) != tuple(record.shape) or dtype != record.dtype:
                raise TraceError(f"the shard holds {dtype}{list(held.shape)} but the manifest says "
                                 f"{record.dtype}{list(record.shape)}", path=path, key=record.key, fix=RECAPTURE)
        self._tensors[file] = tensors
        return tensors

    def _check(self, file: str) -> None:
        with self._locks[file]:
            if file in self._verified:
                return
            info = self.infos[file]
            self._open(file)
            digest = file_digest(self.folder / file, info.algorithm, mapped=self._mapped[file])
            if digest != info.digest:
                raise TraceError(f"shard checksum ({info.algorithm}) does not match the manifest: the file is corrupt",
                                 path=self.folder / file, fix="copy the trace folder again, or " + RECAPTURE)
            self._verified.add(file)

    def verify(self) -> None:
        """Check every shard's checksum against the manifest."""
        for file in self.infos:
            self._check(file)

    def pending_checks(self) -> list[tuple[str, Callable[[], None]]]:
        """Each shard not checked yet: its checksum in the manifest, and a call that checks it (as
        loading one of its tensors would)."""
        return [(info.digest, partial(self._check, file)) for file, info in self.infos.items()
                if file not in self._verified]

    def lazy(self, key: str) -> LazyTensor:
        """The stored tensor as a :class:`LazyTensor` whose loader checks the shard's checksum first."""
        key = self.same_as.get(key, key)
        file = self.shard_of[key]
        tensors = self._tensors.get(file)
        if tensors is None:  # not open yet (a fresh capture's): never wait on a checksum being computed
            with self._locks[file]:
                tensors = self._open(file)
        inner = tensors[key]

        def load() -> torch.Tensor:
            self._check(file)
            return inner.loader()

        def span() -> Any:
            # Not checksummed: a raw-byte comparison that finds both sides' bytes equal is right
            # about what the files hold whatever a checksum says (sizes and headers were checked
            # at open); where bytes differ, the values are then loaded, and load() checks first.
            return inner.span() if inner.span is not None else None

        return LazyTensor(inner.shape, inner.dtype, inner.nbytes, inner.location, load, span=span,
                          verify=lambda: self._check(file))

    def load(self, key: str) -> torch.Tensor:
        return self.lazy(key).loader()

    def close(self) -> None:
        for handle in self._handles:
            handle.close()


def _as_set(value: str | Collection[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


class Trace:
    """The records of one captured run and their tensors.

    Attributes:
        path: the trace folder, or ``None`` for an in-memory trace.
        records: every record, in execution order (index ascending).
        provenance: schema, package versions, device, dtype, seed, model class, checkpoint and
            input hashes, command line, mode, rank and world size.
        mode: ``full``, ``stats`` or ``window``.

    Example:
        >>> import torch, tensorparity.trace as tt
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with tt.capture(model) as trace:
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> trace.layers()
        ['<model>', '0', '1']
        >>> [r.key for r in trace.select(kind="output")]
        ['0/0/output', '1/0/output']
    """

    def __init__(self, records: list[TraceRecord] | None = None, provenance: dict[str, Any] | None = None,
                 mode: str = "full", *, path: Path | None = None, tensors: dict[str, torch.Tensor] | None = None,
                 shards: ShardSet | None = None) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown trace mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
        self.path = path
        self.records: list[TraceRecord] = list(records or [])
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.mode = mode
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self._shards = shards
        self._index: dict[str, TraceRecord] | None = None

    # Reading
    def _by_key(self) -> dict[str, TraceRecord]:
        if self._index is None or len(self._index) != len(self.records):
            self._index = {r.key: r for r in self.records}
        return self._index

    def get(self, key: str) -> TraceRecord:
        """The record stored under ``key`` (``module/call/kind[/path]``); KeyError if none."""
        return self._by_key()[key]

    def load(self, record: TraceRecord | str) -> torch.Tensor:
        """The stored tensor of a record (or record key).

        Raises:
            TraceError: the record holds statistics only (stats mode, outside the window) or a
                value; or its shard is corrupt.
        """
        if isinstance(record, str):
            record = self.get(record)
        if not record.stored:
            what = "a non-tensor value" if not record.is_tensor else f"statistics only (mode {self.mode})"
            raise TraceError(f"the record holds {what}, not a stored tensor", path=self.path, key=record.key,
                             fix="capture with mode='full', or with a window that includes this layer")
        if record.key in self._tensors:
            return self._tensors[record.key]
        if self._shards is None:
            raise TraceError("the trace holds no tensor under this key", path=self.path, key=record.key,
                             fix="capture the trace again")
        return self._shards.load(record.key)

    def lazy(self, record: TraceRecord | str) -> LazyTensor:
        """The stored tensor of a record, located but not read (what ``tensorparity.open`` lists)."""
        if isinstance(record, str):
            record = self.get(record)
        if record.stored and record.key not in self._tensors and self._shards is not None:
            return self._shards.lazy(record.key)
        tensor = self.load(record)
        return LazyTensor(tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(),
                          "in memory", lambda: tensor)

    def layers(self) -> list[str]:
        """Layer names (``module`` or ``module#call``) in first-seen order (parameter records
        belong to no call: a module that owns parameters but never ran is not a layer)."""
        return list(dict.fromkeys(r.layer for r in self.records if r.kind != "param"))

    def parameters(self) -> dict[str, torch.Tensor | LazyTensor]:
        """The stored parameters by their ``state_dict`` key (``owner.name``), in model order:
        tensors for a trace in memory, located :class:`LazyTensor` s for a trace folder (read on
        ``.loader()``); both are what :func:`tensorparity.open` and
        :func:`tensorparity.mapping.suggest_mapping` take. Empty for a trace without stored
        parameters (``stats`` mode, ``params=False``, a trace older than parameter records).

        Example:
            >>> import torch, tensorparity.trace as tt
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3))
            >>> with tt.capture(model) as trace:
            ...     _ = model(torch.ones(1, 2))
            >>> {k: tuple(v.shape) for k, v in trace.parameters().items()}
            {'0.weight': (3, 2), '0.bias': (3,)}
        """
        out: dict[str, torch.Tensor | LazyTensor] = {}
        for r in self.records:
            if r.kind == "param" and r.stored:
                out[param_name(r)] = self._tensors[r.key] if r.key in self._tensors else self.lazy(r)
        return out

    def parameter_stats(self) -> dict[str, TensorStats]:
        """Every recorded parameter's statistics and fingerprint by ``state_dict`` key (any mode).

        Example:
            >>> import torch, tensorparity.trace as tt
            >>> model = torch.nn.Linear(2, 3)
            >>> with tt.capture(model, mode="stats") as trace:
            ...     _ = model(torch.ones(1, 2))
            >>> trace.parameter_stats()["bias"].numel
            3
        """
        return {param_name(r): r.stats for r in self.records if r.kind == "param" and r.stats is not None}

    def module_path(self, name: str) -> str:
        """The registered module path (``model.get_submodule(...)``) of a recorded module name.

        A call is recorded under its call site (see :mod:`tensorparity.trace.capture`): one
        module shared by several parents is recorded once per parent; the provenance's
        ``call_sites`` maps those names back. Layer names (``module#call``, ``<model>``) are
        accepted; a name the table does not list is returned as it is.

        Example:
            >>> import torch, tensorparity.trace as tt
            >>> act = torch.nn.SiLU()
            >>> model = torch.nn.Sequential(torch.nn.Sequential(act), torch.nn.Sequential(act))
            >>> with tt.capture(model) as trace:
            ...     _ = model(torch.ones(2))
            >>> [r.module for r in trace.select(kind="output")][:3]
            ['0.0', '0', '1.0']
            >>> trace.module_path("1.0"), trace.module_path("1.0#1"), trace.module_path("<model>")
            ('0.0', '0.0', '')
        """
        if name == "<model>":
            return ""
        base, _, call = name.rpartition("#")
        if base and call.isdigit():
            name = base
        sites = self.provenance.get("call_sites") or {}
        found = sites.get(name, name) if isinstance(sites, dict) else name
        return str(found)

    def select(self, *, kind: str | Collection[str] | None = None, layer: str | Collection[str] | None = None,
               module: str | Collection[str] | None = None) -> list[TraceRecord]:
        """Records of the given kind(s), layer(s) (``module#call``) and/or module path(s), in order."""
        kinds, layers, modules = _as_set(kind), _as_set(layer), _as_set(module)
        return [r for r in self.records if (kinds is None or r.kind in kinds) and (layers is None or r.layer in layers)
                and (modules is None or r.module in modules)]

    def inputs(self, call: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's input of one call, as ``(args, kwargs)``, to replay it: ``model(*args, **kwargs)``.

        Nested inputs are rebuilt as lists (numeric path parts) and dicts (named parts).
        """
        rows = [r for r in self.records if r.kind == "model_input" and r.call == call]
        if not rows and 0 <= call < len(self.provenance.get("input_hashes") or []):
            return (), {}  # the model was called without arguments
        if not rows:
            raise TraceError(f"the trace holds no model input of call {call}", path=self.path,
                             fix="capture the trace again (model inputs are always stored)")
        return rebuild_call(rows, self.load)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        stored = sum(r.stored for r in self.records)
        where = str(self.path) if self.path is not None else "in memory"
        return (f"<Trace {self.mode} {where}: {len(self.records)} records, {len(self.layers())} layers, "
                f"{stored} stored tensors>")

    # Files
    @staticmethod
    def ranks(path: str | os.PathLike[str]) -> list[int]:
        """The ranks of a multi-process trace (``rank-<r>/`` folders); ``[]`` for a single one."""
        return list(rank_folders(Path(path)))

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, rank: int | None = None) -> Trace:
        """Read a trace folder: manifest (schema, records), shard sizes and headers are checked now,
        shard checksums when their tensors are first loaded (or by :meth:`verify`).

        Args:
            path: the trace folder.
            rank: which rank of a multi-process trace (a folder holding ``rank-<r>/``). Without
                one, a trace captured with DTensors as local shards (FSDP2, tensor parallel;
                ``capture(..., dtensor="local")``) opens as one trace: its sharded records are
                assembled from every rank's shard (shape, statistics, tensor), the others are
                rank 0's (``provenance["assembled"]`` says so).

        Raises:
            TraceError: missing manifest (a capture that did not finish), unknown schema major
                version, a shard missing, truncated or not matching the manifest; for an
                assembled trace, ranks missing, ranks of different world sizes, shards that do
                not tile a tensor (when it is loaded).
            UsageError: a multi-process trace without DTensor shards opened without ``rank``.
        """
        folder = Path(path)
        if not folder.is_dir():
            if folder.exists():
                raise TraceError("not a folder", path=folder, fix="pass the trace folder (it holds manifest.json)")
            raise TraceError("no such trace folder", path=folder, fix="check the path")
        if not (folder / MANIFEST).exists():
            ranks = rank_folders(folder)
            if rank is not None and rank in ranks:
                folder = ranks[rank]
            elif rank is not None and ranks:
                raise UsageError(f"the trace has no rank {rank} (ranks {', '.join(map(str, ranks))})",
                                 path=folder, fix="pass one of the ranks it holds")
            elif ranks and rank is None and (assembled := cls._assembled(folder, ranks)) is not None:
                return assembled
            elif len(ranks) == 1:
                folder = next(iter(ranks.values()))
            elif ranks:
                raise UsageError(f"the trace holds {len(ranks)} ranks ({', '.join(map(str, ranks))})", path=folder,
                                 fix="pass rank=N (Trace.open(path, rank=0)) or the rank-N folder itself")
        manifest = read_manifest(folder)
        got = manifest["provenance"].get("rank")
        if rank is not None and got is not None and got != rank:
            raise UsageError(f"this trace folder holds rank {got}, not rank {rank}", path=folder,
                             fix="pass the folder that holds all ranks, or rank=" + str(got))
        shards = ShardSet(folder, manifest["shards"], manifest["shard_of"], manifest["records"],
                          same_as=manifest["same_as"])
        return cls(manifest["records"], manifest["provenance"], manifest["mode"], path=folder, shards=shards)

    @classmethod
    def _assembled(cls, folder: Path, ranks: dict[int, Path]) -> Trace | None:
        """The ranks of a DTensor capture as one trace; ``None`` when rank 0 holds no local shard."""
        first = read_manifest(ranks[min(ranks)])
        if not is_sharded_trace(first):
            return None
        manifests = {r: (first if r == min(ranks) else read_manifest(p)) for r, p in ranks.items()}
        records, prov, mode, pieces = assemble_ranks(folder, manifests)
        sets = {r: ShardSet(ranks[r], m["shards"], m["shard_of"], m["records"], same_as=m["same_as"])
                for r, m in manifests.items()}
        return cls(records, prov, mode, path=folder, shards=RankShards(folder, sets, pieces, records))  # type: ignore[arg-type]

    def verify(self) -> None:
        """Check every shard's checksum now (raises :class:`TraceError` naming the shard)."""
        if self._shards is not None:
            self._shards.verify()

    def pending_checks(self) -> list[tuple[str, Callable[[], None]]]:
        """The shards not checked yet: each one's checksum and a call that checks it (see
        :func:`~tensorparity.checkpoint.tracefolder.ahead.check_ahead`)."""
        return self._shards.pending_checks() if self._shards is not None else []

    def save(self, path: str | os.PathLike[str], *, shard_bytes: int = 256 << 20) -> Trace:
        """Write this trace to a new folder in the trace format and return it opened from there.

        Example:
            >>> import tempfile, torch, tensorparity.trace as tt
            >>> model = torch.nn.Linear(2, 2)
            >>> with tt.capture(model) as trace:
            ...     _ = model(torch.ones(1, 2))
            >>> saved = trace.save(tempfile.mkdtemp() + "/t")
            >>> torch.equal(saved.load(saved.get("<model>/0/model_output")),
            ...             trace.load("<model>/0/model_output"))
            True
        """
        folder = prepare_folder(path)
        writer = TraceWriter(folder, shard_bytes=shard_bytes)
        try:
            for record in self.records:
                if record.stored:
                    writer.put(record.key, self.load(record))
        except BaseException:
            writer.abort()
            raise
        shards = writer.close()
        provenance = dict(self.provenance)
        write_manifest(folder, build_manifest(self.records, provenance, self.mode, shards, writer.shard_of))
        return Trace.open(folder)

    def _bind(self, folder: Path | None, records: list[TraceRecord], provenance: dict[str, Any],
              shards: ShardSet | None, tensors: dict[str, torch.Tensor]) -> None:
        """Fill a trace that capture handed out before it was complete."""
        self.path, self.records, self.provenance = folder, records, provenance
        self._shards, self._tensors, self._index = shards, tensors, None

    def close(self) -> None:
        """Release the shard files (tensors already loaded stay valid)."""
        if self._shards is not None:
            self._shards.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def param_name(record: TraceRecord) -> str:
    """A parameter record's ``state_dict`` key: ``owner.name`` (``name`` for the model's own).

    Example:
        >>> param_name(TraceRecord(1, "layers.0.fc", 0, "Linear", "param", "weight", (2,), "float32", "cpu",
        ...                        None, False))
        'layers.0.fc.weight'
    """
    return f"{record.module}.{record.path}" if record.module else record.path


def rebuild_call(
    rows: list[TraceRecord], load: Callable[[TraceRecord], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A recorded call's ``(args, kwargs)`` from its input records: numeric path parts are
    positions (and list indices), named parts keywords (and dict keys).

    Example:
        >>> rows = [TraceRecord(0, "", 0, "M", "model_input", p, (), "int", "cpu", None, False, v, False)
        ...         for p, v in (("0", 1), ("1.0", 2), ("mask", 3))]
        >>> rebuild_call(rows, lambda r: None)
        ((1, [2]), {'mask': 3})
    """
    root: dict[str, Any] = {}
    for r in rows:
        value = load(r) if r.is_tensor else r.value
        parts = r.path.split(".") if r.path else [""]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def build(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [build(node[k]) for k in sorted(node, key=int)]
        return {k: build(v) for k, v in node.items()}

    args = tuple(build(root[k]) for k in sorted((k for k in root if k.isdigit()), key=int))
    return args, {k: build(v) for k, v in root.items() if not k.isdigit()}
