"""An "older release" of a training loop, and the data-loader state files it wrote.

Before torchdata's ``StatefulDataLoader``, training frameworks resumed data loading by hand: a
plain ``torch.utils.data.DataLoader``, a sampler reseeded ``seed + epoch`` every epoch (as
``DistributedSampler`` does), and at every checkpoint one global record (``loader_state.json``:
step, epoch, batch size, shuffle seed, workers, dataset kind) plus one record per worker
(``worker_<i>.json``: samples it streamed this epoch and, for streamed datasets, its shard
position). :func:`run_legacy_training` is such a loop: it writes that layout at a chosen step and
keeps going, so the batches the uninterrupted run yielded afterwards are known, which is what a
converted state must reproduce. :func:`step` is the demo's data-loader step.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["EpochShuffleSampler", "LegacyRun", "ShardedStream", "SquaresDataset", "run_legacy_training", "step"]


class SquaresDataset(Dataset[torch.Tensor]):
    """A tiny map-style dataset: sample ``i`` is ``[i, i*i]``.

    Example:
        >>> SquaresDataset(5)[3].tolist()
        [3, 9]
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, i * i])


class EpochShuffleSampler(Sampler[int]):
    """The old release's sampler: epoch ``e`` is ``torch.randperm(n)`` seeded ``seed + e``.

    Example:
        >>> s = EpochShuffleSampler(4, seed=0)
        >>> s.set_epoch(1); sorted(s)
        [0, 1, 2, 3]
    """

    def __init__(self, n: int, *, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class ShardedStream(IterableDataset[dict[str, int]]):
    """A streamed dataset of ``num_shards`` shards of ``shard_size`` samples; worker ``w`` of
    ``W`` reads shards ``w, w + W, ...`` in order, so its position only has meaning for ``W``.

    It resumes the way torchdata expects an iterable to: ``state_dict()`` is the next sample to
    read, ``{"shard": s, "offset": o}``, and ``load_state_dict`` makes the next ``iter`` start there.

    Example:
        >>> ds = ShardedStream(num_shards=2, shard_size=2)
        >>> [(x["shard"], x["offset"]) for x in ds]
        [(0, 0), (0, 1), (1, 0), (1, 1)]
        >>> ds.load_state_dict({"shard": 1, "offset": 1}); [(x["shard"], x["offset"]) for x in ds]
        [(1, 1)]
    """

    def __init__(self, *, num_shards: int, shard_size: int) -> None:
        self.num_shards, self.shard_size = num_shards, shard_size
        self._resume: dict[str, int] | None = None
        self._position: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return dict(self._position or self._resume or {})

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"shard": int(state["shard"]), "offset": int(state["offset"])} if state else None

    def __iter__(self) -> Iterator[dict[str, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self._resume or {"shard": worker, "offset": 0}
        self._resume, self._position = None, dict(start)
        shard, offset = start["shard"], start["offset"]
        while shard < self.num_shards:
            if offset >= self.shard_size:
                shard, offset = shard + workers, 0
                continue
            self._position = {"shard": shard, "offset": offset + 1}  # the next sample to read
            yield {"shard": shard, "offset": offset}
            offset += 1
        self._position = None  # exhausted: the next epoch starts over


@dataclass(frozen=True)
class LegacyRun:
    """What :func:`run_legacy_training` did.

    Attributes:
        folder: the legacy loader-state folder written at the checkpoint.
        before: the batches of the checkpoint's epoch consumed before the checkpoint.
        after: the batches the uninterrupted run yielded after it (the rest of the epoch, then
            ``next_epochs`` whole epochs for map-style datasets).
    """

    folder: Path
    before: list[Any]
    after: list[Any]


def _write(path: Path, record: dict[str, Any], fmt: str) -> None:
    # The old release wrote in place, not atomically; converting never writes here.
    if fmt == "json":
        path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    else:
        torch.save(record, path.with_suffix(".pt"))


def _next_position(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"shard": int(batch["shard"][-1]), "offset": int(batch["offset"][-1]) + 1}


def run_legacy_training(
    folder: str | Path,
    *,
    dataset_kind: str = "map",
    dataset_size: int = 22,
    num_shards: int = 6,
    shard_size: int = 5,
    batch_size: int = 4,
    num_workers: int = 0,
    shuffle: bool = True,
    shuffle_seed: int = 1234,
    drop_last: bool = False,
    stop_epoch: int = 1,
    stop_step: int = 3,
    next_epochs: int = 0,
    fmt: str = "json",
) -> LegacyRun:
    """Train (read data) the old way, write the legacy loader state at ``(stop_epoch, stop_step)``
    and keep going, recording what the uninterrupted run yields after the checkpoint.

    Args:
        folder: where the legacy layout is written (created).
        dataset_kind: ``"map"`` (:class:`SquaresDataset`) or ``"iterable"`` (:class:`ShardedStream`).
        stop_epoch: the epoch of the checkpoint; earlier epochs are read in full first.
        stop_step: batches consumed in that epoch when the checkpoint is written.
        next_epochs: map-style: whole epochs to read after the checkpoint's epoch.
        fmt: ``"json"`` or ``"torch"`` (``torch.save`` of the same plain records).

    Example:
        >>> import tempfile
        >>> run = run_legacy_training(Path(tempfile.mkdtemp()), stop_epoch=0, stop_step=2)
        >>> sorted(p.name for p in run.folder.iterdir()), len(run.before), len(run.after)
        (['loader_state.json', 'worker_0.json'], 2, 4)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    readers = max(num_workers, 1)
    options = {"dataset_kind": dataset_kind, "dataset_size": dataset_size, "batch_size": batch_size,
               "num_workers": num_workers, "shuffle": shuffle, "shuffle_seed": shuffle_seed, "drop_last": drop_last,
               "fmt": fmt}
    sampler = None
    if dataset_kind == "map":
        dataset: Any = SquaresDataset(dataset_size)
        sampler = EpochShuffleSampler(dataset_size, seed=shuffle_seed) if shuffle else None
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            drop_last=drop_last)
    else:
        dataset = ShardedStream(num_shards=num_shards, shard_size=shard_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    global_step = 0
    before: list[Any] = []
    after: list[Any] = []
    saved = False
    last_epoch = stop_epoch + (next_epochs if dataset_kind == "map" else 0)
    for epoch in range(last_epoch + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        streamed = [0] * readers
        positions: list[dict[str, int]] = [{"shard": w, "offset": 0} for w in range(readers)]
        for j, batch in enumerate(loader):
            if epoch == stop_epoch and j == stop_step:
                _save(folder, global_step, epoch, j, streamed, positions, **options)
                saved = True
            if epoch == stop_epoch:
                (before if j < stop_step else after).append(batch)
            elif epoch > stop_epoch:
                after.append(batch)
            # In order, batch j came from worker j % readers: the old release counted that way.
            worker = j % readers
            streamed[worker] += len(batch) if dataset_kind == "map" else len(batch["shard"])
            if dataset_kind == "iterable":
                positions[worker] = _next_position(batch)
            global_step += 1
        if epoch == stop_epoch and not saved:
            if stop_step != len(before):
                raise ValueError(f"stop_step {stop_step} is past the end of epoch {epoch} ({len(before)} batches)")
            _save(folder, global_step, epoch, stop_step, streamed, positions, **options)
            saved = True
    return LegacyRun(folder=folder, before=before, after=after)


def _save(folder: Path, global_step: int, epoch: int, step_in_epoch: int, streamed: list[int],
          positions: list[dict[str, int]], *, dataset_kind: str, dataset_size: int, batch_size: int,
          num_workers: int, shuffle: bool, shuffle_seed: int, drop_last: bool, fmt: str) -> None:
    record: dict[str, Any] = {"version": 1, "global_step": global_step, "epoch": epoch,
                              "step_in_epoch": step_in_epoch, "batch_size": batch_size, "drop_last": drop_last,
                              "num_workers": num_workers, "dataset_kind": dataset_kind}
    if dataset_kind == "map":
        record.update(shuffle=shuffle, shuffle_seed=shuffle_seed, dataset_size=dataset_size)
    _write(folder / "loader_state", record, fmt)
    for w, count in enumerate(streamed):
        worker: dict[str, Any] = {"worker_id": w, "epoch": epoch, "samples_streamed": count}
        if dataset_kind == "iterable":
            worker["position"] = positions[w]
        _write(folder / f"worker_{w}", worker, fmt)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))


def step(console: Console, out: Path) -> None:
    """The demo's data-loader step: an old run's loader state is converted, re-mapped from 2 to 3
    workers, and a real ``StatefulDataLoader`` resumes exactly where the old run stood; an
    iterable dataset's re-map is refused."""
    from tensorparity.dataloader._state import convert_dataloader_state
    from tensorparity.errors import TensorParityError

    console.rule("[bold]data-loader state: legacy release -> torchdata StatefulDataLoader")
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        console.print("[yellow]skipping: torchdata is not installed (pip install 'tensorparity[dataloader]')")
        return
    root = out / "dataloader"
    legacy = run_legacy_training(root / "legacy_map", num_workers=2, stop_epoch=1, stop_step=2)
    record = json.loads((legacy.folder / "loader_state.json").read_text())
    console.print(f"the old release wrote {', '.join(sorted(p.name for p in legacy.folder.iterdir()))}:")
    console.print(f"  loader_state.json = {json.dumps(record)}")
    conv = convert_dataloader_state(legacy.folder, root / "dataloader_state.pt", num_workers=3, force=True)
    console.print(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = StatefulDataLoader(SquaresDataset(22), batch_size=4, shuffle=True, num_workers=3)
        loader.load_state_dict(torch.load(root / "dataloader_state.pt", weights_only=True))
        resumed = list(loader)
    same = len(resumed) == len(legacy.after) and all(_same(a, b) for a, b in zip(legacy.after, resumed))
    mark = "[green]identical[/green]" if same else "[red]DIFFERENT[/red]"
    console.print(f"resumed with 3 workers: the {len(resumed)} remaining batches of epoch 1 vs the uninterrupted "
                  f"old run: {mark}  (next: {resumed[0][:, 0].tolist() if resumed else []})")
    stream = run_legacy_training(root / "legacy_stream", dataset_kind="iterable", num_workers=2, stop_epoch=0,
                                 stop_step=3)
    try:
        convert_dataloader_state(stream.folder, root / "stream_state.pt", num_workers=3, force=True)
    except TensorParityError as exc:
        console.print(f"iterable dataset, 2 -> 3 workers: [yellow]refused[/yellow]: {exc}")
