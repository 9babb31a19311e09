"""Read the legacy data-loader state layout that older training releases wrote.

The layout (version 1, documented in ``docs/dataloader-state.md``) is a folder::

    loader_state.json        one global record (or loader_state.pt: torch.save of the same dict)
    worker_0.json            one record per worker: samples it streamed this epoch
    worker_1.json            (and, for iterable datasets, its shard position)
    ...

With ``num_workers`` 0 the main process is the only reader and writes ``worker_0``. Every value is
plain data; ``.pt`` files are read with ``torch.load(weights_only=True)``, which refuses anything
but tensors and containers, so no file can run code. Everything is validated before anything
is converted, and the whole set must agree with itself (the per-worker counts must be what a
loader that yielded ``step_in_epoch`` batches in order gave each worker).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorparity.errors import (
    CorruptCheckpointError,
    SourceNotFoundError,
    TensorParityError,
    UnsafeCheckpointError,
    UsageError,
)

__all__ = ["GLOBAL_NAME", "LEGACY_VERSIONS", "LegacyLoaderState", "LegacyWorker", "expected_worker_samples",
           "load_plain", "read_legacy_loader_state"]

GLOBAL_NAME = "loader_state"
LEGACY_VERSIONS = (1,)
_SUFFIXES = (".json", ".pt")
_MAX_BYTES = 16 * 1024 * 1024  # a loader state is a few hundred bytes; anything huge is not one
_WORKER_FILE = re.compile(r"worker_(\d+)\.(json|pt)")
_KINDS = ("map", "iterable")
_MAX_SEED = 2**63 - 1 - 2**20  # torch seeds are 64-bit; room left for + epoch
_MAX_WORKERS = 1024  # one file each; a corrupt count must not make us stat a billion names
_RESEND = "copy the loader_state file and every worker_<i> file written at one checkpoint into one folder"


@dataclass(frozen=True)
class LegacyWorker:
    """One worker's record: how many samples it streamed this epoch, and where it stands.

    Attributes:
        worker_id: the worker's index (0 for the main process when ``num_workers`` is 0).
        epoch: the epoch the record was written in.
        samples_streamed: samples this worker delivered to the training loop this epoch.
        position: for iterable datasets, the worker's shard position as the old release wrote
            it (the next sample to read), e.g. ``{"shard": 3, "offset": 2}``; ``None`` for map-style.
        path: the file it was read from.
    """

    worker_id: int
    epoch: int
    samples_streamed: int
    position: dict[str, Any] | None
    path: Path


@dataclass(frozen=True)
class LegacyLoaderState:
    """The whole legacy layout, validated: the global record and one record per worker.

    Attributes:
        path: the folder.
        version: the layout version (1).
        global_step: batches consumed since the start of training.
        epoch: the epoch being read (0-based).
        step_in_epoch: batches consumed in this epoch.
        batch_size: samples per batch.
        drop_last: whether the last incomplete batch of an epoch was dropped.
        shuffle: whether map-style sampling was shuffled.
        shuffle_seed: the seed of the shuffle; epoch ``e`` read ``torch.randperm(n)`` drawn from a
            generator seeded ``shuffle_seed + e``.
        num_workers: loader worker processes (0: the main process read the data).
        dataset_kind: ``"map"`` or ``"iterable"``.
        dataset_size: samples in the map-style dataset (``None`` for iterable ones).
        worker_seed: the base seed workers were seeded from, if the release recorded it.
        workers: one record per worker, by worker id.
    """

    path: Path
    version: int
    global_step: int
    epoch: int
    step_in_epoch: int
    batch_size: int
    drop_last: bool
    shuffle: bool
    shuffle_seed: int | None
    num_workers: int
    dataset_kind: str
    dataset_size: int | None
    worker_seed: int | None
    workers: tuple[LegacyWorker, ...] = field(default=())

    @property
    def readers(self) -> int:
        """Processes that read data: ``num_workers``, or 1 when the main process did."""
        return max(self.num_workers, 1)

    @property
    def samples_in_epoch(self) -> int:
        """Samples consumed in this epoch (the sum over workers)."""
        return sum(w.samples_streamed for w in self.workers)

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches in one epoch of a map-style dataset (``None`` for iterable ones)."""
        if self.dataset_size is None:
            return None
        n, bs = self.dataset_size, self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)


def expected_worker_samples(*, batches: int, batch_size: int, readers: int,
                            dataset_size: int | None = None) -> list[int]:
    """Samples each reader delivered after ``batches`` in-order batches (batch ``j`` comes from
    reader ``j % readers``, as torch's DataLoader assigns them); the last batch of a map-style
    epoch may be short.

    Example:
        >>> expected_worker_samples(batches=5, batch_size=4, readers=2)
        [12, 8]
        >>> expected_worker_samples(batches=3, batch_size=4, readers=2, dataset_size=10)
        [6, 4]
    """
    if dataset_size is not None:
        batches = min(batches, math.ceil(dataset_size / batch_size))
    # Arithmetic, not a loop over batches: a corrupt file may claim billions of them.
    counts = [((batches - w + readers - 1) // readers if batches > w else 0) * batch_size for w in range(readers)]
    if dataset_size is not None and batches * batch_size > dataset_size:
        counts[(batches - 1) % readers] -= batches * batch_size - dataset_size  # the epoch's short last batch
    return counts


def _find(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{s}" for s in _SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise CorruptCheckpointError(f"both {found[0].name} and {found[1].name} exist", path=folder,
                                     fix=f"keep the one written at the checkpoint you resume from; {_RESEND}")
    return found[0] if found else None


def load_plain(path: Path, *, what: str = "a loader-state record") -> Any:
    """Read a JSON file, or a torch.save file of plain data (``weights_only=True``: never code).

    Raises:
        CorruptCheckpointError: unreadable, not JSON, not a torch.save file, or far too large.
        UnsafeCheckpointError: a torch.save file that holds more than plain data.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "w.pt"; torch.save({"worker_id": 0}, p)
        >>> load_plain(p)
        {'worker_id': 0}
    """
    size = path.stat().st_size
    if size > _MAX_BYTES:
        raise CorruptCheckpointError(f"{size:,} bytes is far too large for {what}", path=path,
                                     fix="point at the folder of loader_state.json and worker_<i>.json files")
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise CorruptCheckpointError("not UTF-8 text, so not JSON", path=path,
                                         fix="restore the file from the original run's checkpoint") from None
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                                         path=path, fix="restore the file from the original run's checkpoint "
                                                        "(it may have been truncated by a crash)") from None
    import pickle

    import torch

    try:
        # weights_only: torch's restricted unpickler; plain data and tensors only, never code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = " ".join(str(exc).split())[:160]
        raise UnsafeCheckpointError(f"refused: the file holds more than plain data ({first})", path=path,
                                    fix="a loader-state file holds only numbers and strings; re-export it as JSON "
                                        "from a trusted copy") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"not a readable torch.save file ({' '.join(str(exc).split())[:120]})",
                                     path=path, fix="restore the file from the original run's checkpoint") from None


class _Fields:
    """Typed access to one record's fields; every problem names the file and the key."""

    def __init__(self, data: Any, path: Path) -> None:
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"holds a {type(data).__name__}, not a record of named fields",
                                         path=path, fix="restore the file from the original run's checkpoint")
        self.data, self.path = data, path

    def int(self, key: str, *, default: int | None = None, required: bool = True, minimum: int = 0,
            maximum: int | None = None) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            if required:
                raise CorruptCheckpointError("required field is missing", path=self.path, key=key,
                                             fix=f"add \"{key}\" as the old release wrote it, or restore the file")
            return None
        if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            value = value.item()  # a 0-d tensor in a .pt record
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CorruptCheckpointError(f"{value!r} is not an integer >= {minimum}", path=self.path, key=key,
                                         fix="restore the file from the original run's checkpoint")
        if maximum is not None and value > maximum:
            raise CorruptCheckpointError(f"{value!r} is not plausible (at most {maximum})", path=self.path, key=key,
                                         fix="restore the file from the original run's checkpoint")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise CorruptCheckpointError(f"{value!r} is not true or false", path=self.path, key=key,
                                         fix="restore the file from the original run's checkpoint")
        return value


def _read_global(path: Path) -> dict[str, Any]:
    f = _Fields(load_plain(path), path)
    version = f.data.get("version")
    if version is None:
        raise CorruptCheckpointError("no \"version\" field, so not a legacy loader-state record", path=path,
                                     key="version", fix="point at the folder the old release wrote its loader "
                                                        "state to (loader_state.json with \"version\": 1)")
    if version not in LEGACY_VERSIONS or isinstance(version, bool):
        raise UsageError(f"unknown legacy loader-state version {version!r}; this tensorparity reads version "
                         f"{', '.join(map(str, LEGACY_VERSIONS))}", path=path, key="version",
                         fix="upgrade tensorparity, or export the state with a release that writes version 1")
    kind = f.data.get("dataset_kind")
    if kind not in _KINDS:
        raise CorruptCheckpointError(f"{kind!r} is not one of {', '.join(_KINDS)}", path=path, key="dataset_kind",
                                     fix="set \"dataset_kind\" to \"map\" or \"iterable\"")
    shuffle = f.bool("shuffle", False)
    record = {
        "version": version, "dataset_kind": kind, "shuffle": shuffle,
        "global_step": f.int("global_step"), "epoch": f.int("epoch", maximum=2**20),
        "step_in_epoch": f.int("step_in_epoch"),
        "batch_size": f.int("batch_size", minimum=1), "drop_last": f.bool("drop_last", False),
        "num_workers": f.int("num_workers", maximum=_MAX_WORKERS),
        "shuffle_seed": f.int("shuffle_seed", required=shuffle, maximum=_MAX_SEED),
        "dataset_size": f.int("dataset_size", required=kind == "map", minimum=1),
        "worker_seed": f.int("worker_seed", required=False, maximum=_MAX_SEED),
    }
    if kind == "iterable" and shuffle:
        raise CorruptCheckpointError("an iterable dataset cannot be shuffled by the loader", path=path,
                                     key="shuffle", fix="set \"shuffle\": false (the dataset shuffles itself)")
    return record


def _read_worker(path: Path, worker_id: int, *, kind: str) -> LegacyWorker:
    f = _Fields(load_plain(path), path)
    recorded = f.int("worker_id")
    if recorded != worker_id:
        raise CorruptCheckpointError(f"holds worker_id {recorded}, but its name says worker {worker_id}",
                                     path=path, key="worker_id", fix=_RESEND)
    position = f.data.get("position")
    if kind == "iterable" and not isinstance(position, dict):
        raise CorruptCheckpointError("an iterable dataset's worker record needs its shard position",
                                     path=path, key="position",
                                     fix="add \"position\": {...} as the old release wrote it, e.g. "
                                         "{\"shard\": 3, \"offset\": 2}, or restore the file")
    return LegacyWorker(worker_id=worker_id, epoch=f.int("epoch") or 0,
                        samples_streamed=f.int("samples_streamed") or 0,
                        position=dict(position) if isinstance(position, dict) else None, path=path)


def _raise_all(problems: list[TensorParityError], folder: Path) -> None:
    """One problem: raise it; several: one line naming each (validate everything, report all)."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        parts = "; ".join(" ".join(f"{p.path or ''} [{p.key}]: {p.message}".replace(" [None]", "").split())
                          for p in problems)
        raise CorruptCheckpointError(f"{len(problems)} problems: {parts}", path=folder, fix=problems[0].fix)


def _check_counts(g: dict[str, Any], workers: list[LegacyWorker], global_path: Path) -> list[TensorParityError]:
    """The set must agree with itself: every disagreement, each naming its file."""
    problems: list[TensorParityError] = []
    for w in workers:
        if w.epoch != g["epoch"]:
            problems.append(CorruptCheckpointError(f"written in epoch {w.epoch}, but {global_path.name} is at "
                                                   f"epoch {g['epoch']}", path=w.path, key="epoch", fix=_RESEND))
    size = g["dataset_size"]
    if size is not None:
        per_epoch = size // g["batch_size"] if g["drop_last"] else math.ceil(size / g["batch_size"])
        if g["step_in_epoch"] > per_epoch:
            problems.append(CorruptCheckpointError(
                f"step_in_epoch {g['step_in_epoch']} is past the end of an epoch of {per_epoch} batches ({size} "
                f"samples, batch size {g['batch_size']})", path=global_path, key="step_in_epoch", fix=_RESEND))
        if g["global_step"] != g["epoch"] * per_epoch + g["step_in_epoch"]:
            problems.append(CorruptCheckpointError(
                f"global_step {g['global_step']} is not epoch {g['epoch']} x {per_epoch} batches + step_in_epoch "
                f"{g['step_in_epoch']}", path=global_path, key="global_step", fix=_RESEND))
    elif g["global_step"] < g["step_in_epoch"]:
        problems.append(CorruptCheckpointError(
            f"global_step {g['global_step']} is smaller than step_in_epoch {g['step_in_epoch']}", path=global_path,
            key="global_step", fix=_RESEND))
    if problems:
        return problems
    expected = expected_worker_samples(batches=g["step_in_epoch"], batch_size=g["batch_size"],
                                       readers=max(g["num_workers"], 1), dataset_size=size)
    readers = f"{g['num_workers']} workers" if g["num_workers"] else "no workers"
    for w, want in zip(workers, expected):
        if w.samples_streamed != want:
            problems.append(CorruptCheckpointError(
                f"samples_streamed {w.samples_streamed} disagrees with {global_path.name}: a loader with "
                f"{readers} that yielded {g['step_in_epoch']} batches of {g['batch_size']} gives worker "
                f"{w.worker_id} {want} samples", path=w.path, key="samples_streamed", fix=_RESEND))
    return problems


def read_legacy_loader_state(path: str | Path) -> LegacyLoaderState:
    """Read and validate a legacy loader-state folder (or its ``loader_state`` file).

    Args:
        path: the folder, or the ``loader_state.json``/``.pt`` file inside it.

    Returns:
        The validated layout.

    Raises:
        SourceNotFoundError: the folder or its global file does not exist.
        CorruptCheckpointError: a file is unreadable, a field is missing or wrong, a worker file
            is missing or extra, or the counts disagree with each other.
        UnsafeCheckpointError: a ``.pt`` file holds more than plain data.
        UsageError: the layout version is unknown.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "loader_state.json").write_text(json.dumps({"version": 1, "global_step": 2, "epoch": 0,
        ...     "step_in_epoch": 2, "batch_size": 4, "num_workers": 0, "dataset_kind": "map", "dataset_size": 10,
        ...     "shuffle": True, "shuffle_seed": 7}))
        >>> _ = (d / "worker_0.json").write_text(json.dumps({"worker_id": 0, "epoch": 0, "samples_streamed": 8}))
        >>> state = read_legacy_loader_state(d)
        >>> state.samples_in_epoch, state.batches_per_epoch
        (8, 3)
    """
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError("no such folder", path=p, fix="check the path to the legacy loader-state folder")
    folder = p if p.is_dir() else p.parent
    global_path = _find(folder, GLOBAL_NAME)
    if global_path is None:
        raise SourceNotFoundError(f"no {GLOBAL_NAME}.json (or {GLOBAL_NAME}.pt) in the folder", path=folder,
                                  fix="point at the folder the old release wrote its loader state to")
    try:
        g = _read_global(global_path)
        readers = max(g["num_workers"], 1)
        present = {}
        for entry in folder.iterdir():
            m = _WORKER_FILE.fullmatch(entry.name)
            if m:
                present.setdefault(int(m.group(1)), []).append(entry)
        extra = sorted(i for i in present if i >= readers)
        if extra:
            raise CorruptCheckpointError(
                f"worker_{extra[0]} file found, but {global_path.name} says num_workers {g['num_workers']}",
                path=present[extra[0]][0], fix=f"remove files left by a run with more workers; {_RESEND}")
        workers, problems = [], []
        for i in range(readers):
            wpath = _find(folder, f"worker_{i}")
            try:
                if wpath is None:
                    raise CorruptCheckpointError(
                        f"missing worker_{i}.json: {global_path.name} says num_workers {g['num_workers']}, so "
                        f"worker_0 .. worker_{readers - 1} must all be there", path=folder / f"worker_{i}.json",
                        fix=_RESEND)
                workers.append(_read_worker(wpath, i, kind=g["dataset_kind"]))
            except TensorParityError as exc:
                problems.append(exc)
        if not problems:
            problems += _check_counts(g, workers, global_path)
        _raise_all(problems, folder)
    except OSError as exc:
        raise CorruptCheckpointError(f"could not read the folder ({exc.strerror or exc})", path=folder,
                                     fix="check the permissions of the folder and its files") from None
    return LegacyLoaderState(path=folder, workers=tuple(workers), **g)
