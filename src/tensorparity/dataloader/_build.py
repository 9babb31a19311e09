"""Build a torchdata ``StatefulDataLoader`` state from a legacy layout, and read one back.

The state is built by torchdata 0.11's own rules (``torchdata/stateful_dataloader/``):

* without workers, the single-process iterator's dict: ``_sampler_iter_state`` (the batch
  sampler iterator: ``samples_yielded`` plus its sampler's or sampler iterator's state),
  ``_num_yielded``, ``_sampler_iter_yielded``, ``fetcher_state``/``dataset_state`` and
  ``_iterator_finished``;
* with workers, ``_snapshot``: a main snapshot (the same sampler state, ``_num_workers``,
  ``_base_seed``) taken after the last yielded batch, one snapshot per worker
  (``worker_<i>``: its ``dataset_state`` and fetcher state), the last worker that yielded, and
  ``_steps_since_snapshot`` 0.

A shuffled map-style epoch is ``torch.randperm(n)`` drawn from a generator seeded
``shuffle_seed + epoch``; torchdata's ``RandomSampler`` iterator restores by setting its
generator to the saved state, drawing the permutation again and skipping ``yielded`` indices,
so the saved generator state is the freshly seeded one. ``StatefulDistributedSampler`` seeds
``seed + epoch`` itself, so it only needs ``yielded``. Map-style sampling is global to the
loader, which is why the number of workers may change; an iterable dataset's position belongs
to the worker that streamed it, which is why it may not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from tensorparity.dataloader._dataloader_report import DataLoaderStateSummary, WorkerSummary
from tensorparity.dataloader._legacy import LegacyLoaderState, LegacyWorker
from tensorparity.errors import CorruptCheckpointError, UsageError

__all__ = ["SAMPLERS", "build_state", "generator_state", "legacy_order", "resolve_sampler", "summarize_legacy",
           "summarize_state"]

SAMPLERS = ("random", "distributed", "sequential")
DatasetStateFn = Callable[[LegacyWorker], "dict[str, Any] | None"]


def generator_state(seed: int) -> Any:
    """The state of a CPU ``torch.Generator`` freshly seeded with ``seed`` (a uint8 tensor).

    Example:
        >>> generator_state(7).dtype, generator_state(7).equal(generator_state(7))
        (torch.uint8, True)
    """
    import torch

    return torch.Generator().manual_seed(seed).get_state()


def legacy_order(legacy: LegacyLoaderState) -> Any:
    """The dataset indices of the legacy map-style epoch, in the order they were read (an int64 tensor).

    Example:
        >>> from pathlib import Path
        >>> s = LegacyLoaderState(path=Path("."), version=1, global_step=0, epoch=1, step_in_epoch=0,
        ...     batch_size=2, drop_last=False, shuffle=False, shuffle_seed=None, num_workers=0,
        ...     dataset_kind="map", dataset_size=4, worker_seed=None)
        >>> legacy_order(s).tolist()
        [0, 1, 2, 3]
    """
    import torch

    if legacy.dataset_size is None:
        raise UsageError("an iterable dataset has no index order", path=legacy.path,
                         fix="legacy_order applies to map-style datasets only")
    if not legacy.shuffle:
        return torch.arange(legacy.dataset_size)
    gen = torch.Generator().manual_seed((legacy.shuffle_seed or 0) + legacy.epoch)
    return torch.randperm(legacy.dataset_size, generator=gen)


def resolve_sampler(legacy: LegacyLoaderState, sampler: str | None) -> str | None:
    """The target sampler: the one asked for, checked against the legacy run; ``None`` for
    iterable datasets (they have none).

    Example:
        >>> from pathlib import Path
        >>> s = LegacyLoaderState(path=Path("."), version=1, global_step=0, epoch=0, step_in_epoch=0,
        ...     batch_size=2, drop_last=False, shuffle=True, shuffle_seed=3, num_workers=0,
        ...     dataset_kind="map", dataset_size=4, worker_seed=None)
        >>> resolve_sampler(s, None), resolve_sampler(s, "distributed")
        ('random', 'distributed')
    """
    if legacy.dataset_kind == "iterable":
        if sampler not in (None, "sequential"):
            raise UsageError(f"sampler {sampler!r} does not apply to an iterable dataset", path=legacy.path,
                             fix="drop the sampler option: an iterable dataset restarts from its workers' positions")
        return None
    if sampler is None:
        return "random" if legacy.shuffle else "sequential"
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}", fix=f"use one of {', '.join(SAMPLERS)}")
    if sampler == "random" and not legacy.shuffle:
        raise UsageError("the old run did not shuffle, so a RandomSampler (shuffle=True) cannot repeat its order",
                         path=legacy.path, fix="use sampler 'sequential' (shuffle=False) or 'distributed'")
    if sampler == "sequential" and legacy.shuffle:
        raise UsageError("the old run shuffled, so a sequential sampler cannot repeat its order", path=legacy.path,
                         fix="use sampler 'random' (shuffle=True) or 'distributed' (StatefulDistributedSampler)")
    return sampler


def _check_workers(legacy: LegacyLoaderState, num_workers: int) -> None:
    if num_workers < 0:
        raise UsageError(f"num_workers must be 0 or more, not {num_workers}", fix="pass e.g. --num-workers 2")
    if legacy.dataset_kind == "iterable" and max(num_workers, 1) != legacy.readers:
        raise UsageError(
            f"cannot re-map an iterable dataset from {legacy.num_workers} to {num_workers} workers: it shards its "
            f"stream by worker count, so each saved position belongs to one of the {legacy.readers} original "
            f"readers and no assignment to {max(num_workers, 1)} repeats the run",
            path=legacy.path,
            fix=f"convert with --num-workers {legacy.num_workers} (the default), or restart the epoch "
                f"with {num_workers} workers")


def _sampler_iter_state(legacy: LegacyLoaderState, sampler: str | None) -> dict[str, Any]:
    samples = legacy.samples_in_epoch
    if sampler == "random":
        # torchdata's _BatchSamplerIterator: samples_yielded, then its RandomSampler iterator's
        # state (the generator as it was when the epoch's permutation was drawn, and how many
        # indices were taken from it).
        seed = (legacy.shuffle_seed or 0) + legacy.epoch
        return {"samples_yielded": samples,
                "sampler_iter_state": {"yielded": samples, "generator": generator_state(seed)}}
    if sampler == "distributed":
        return {"samples_yielded": samples, "sampler_state": {"yielded": samples}}
    # sequential (skipped by fast-forward) and iterable (the sampler hands out placeholders)
    return {"samples_yielded": samples}


def build_state(legacy: LegacyLoaderState, *, num_workers: int, sampler: str | None,
                dataset_state: DatasetStateFn | None = None) -> dict[str, Any]:
    """The ``StatefulDataLoader.state_dict()`` a loader with ``num_workers`` workers would have
    returned after the legacy run's last batch.

    Args:
        legacy: the validated legacy layout.
        num_workers: the new loader's workers (map-style: any; iterable: the legacy count).
        sampler: from :func:`resolve_sampler`.
        dataset_state: iterable datasets: a worker record -> that worker's ``dataset_state``
            (what the dataset's ``load_state_dict`` takes). Default: the legacy position as is.

    Example:
        >>> from pathlib import Path
        >>> s = LegacyLoaderState(path=Path("."), version=1, global_step=3, epoch=0, step_in_epoch=3,
        ...     batch_size=2, drop_last=False, shuffle=False, shuffle_seed=None, num_workers=0,
        ...     dataset_kind="map", dataset_size=10, worker_seed=None,
        ...     workers=(LegacyWorker(0, 0, 6, None, Path("w")),))
        >>> state = build_state(s, num_workers=0, sampler="sequential")
        >>> state["_num_yielded"], state["_sampler_iter_state"]
        (3, {'samples_yielded': 6})
    """
    _check_workers(legacy, num_workers)
    k = legacy.step_in_epoch
    sampler_state = _sampler_iter_state(legacy, sampler)
    iterable = legacy.dataset_kind == "iterable"

    def worker_state(w: LegacyWorker | None) -> tuple[Any, Any]:
        if not iterable or w is None:
            return None, None
        ds = dataset_state(w) if dataset_state is not None else dict(w.position or {})
        # The dataset's own state_dict/load_state_dict carry the position (torchdata's way of
        # resuming an iterable); its iterator (a generator, typically) has none.
        return {"dataset_iter_state": None, "fetcher_ended": False}, ds

    if num_workers == 0:
        fetcher, ds = worker_state(legacy.workers[0] if iterable else None)
        return {"_index_sampler_state": None, "_sampler_iter_state": sampler_state, "_sampler_iter_yielded": k,
                "_num_yielded": k, "_IterableDataset_len_called": None, "_shared_seed": None,
                "fetcher_state": fetcher, "dataset_state": ds, "_iterator_finished": False}
    workers = {}
    for i in range(num_workers):
        fetcher, ds = worker_state(legacy.workers[i] if iterable else None)
        workers[f"worker_{i}"] = {"worker_id": i, "fetcher_state": fetcher, "dataset_state": ds}
    base_seed = legacy.worker_seed if legacy.worker_seed is not None else (legacy.shuffle_seed or 0)
    main = {"_num_workers": num_workers, "_sampler_iter_state": sampler_state, "_index_sampler_state": None,
            "_sampler_iter_yielded": k, "_IterableDataset_len_called": None, "_shared_seed": None,
            "_base_seed": base_seed}
    # Batches go to workers round-robin from worker 0, in order: batch k-1 came from (k-1) % W.
    last = (k - 1) % num_workers if k else num_workers - 1
    return {"_snapshot": {"_snapshot_step": k, "_last_yielded_worker_id": last, "_main_snapshot": main,
                          "_worker_snapshots": workers},
            "_steps_since_snapshot": 0, "_iterator_finished": False}


def summarize_legacy(legacy: LegacyLoaderState) -> DataLoaderStateSummary:
    """The legacy layout in the fields every loader-state summary shows.

    Example:
        >>> from pathlib import Path
        >>> s = LegacyLoaderState(path=Path("."), version=1, global_step=1, epoch=0, step_in_epoch=1,
        ...     batch_size=2, drop_last=False, shuffle=True, shuffle_seed=3, num_workers=0,
        ...     dataset_kind="map", dataset_size=4, worker_seed=None,
        ...     workers=(LegacyWorker(0, 0, 2, None, Path("w")),))
        >>> summarize_legacy(s).sampler
        'randperm(4) seeded shuffle_seed 3 + epoch 0 = 3'
    """
    if legacy.dataset_kind == "iterable":
        sampler = "none: each worker streams its own shards"
    elif legacy.shuffle:
        sampler = (f"randperm({legacy.dataset_size}) seeded shuffle_seed {legacy.shuffle_seed} + epoch "
                   f"{legacy.epoch} = {(legacy.shuffle_seed or 0) + legacy.epoch}")
    else:
        sampler = f"sequential over {legacy.dataset_size} samples"
    if legacy.drop_last:
        sampler += ", drop_last=True"
    next_worker = legacy.step_in_epoch % legacy.num_workers if legacy.num_workers else None
    return DataLoaderStateSummary(
        source=str(legacy.path), layout=f"legacy/{legacy.version}", dataset_kind=legacy.dataset_kind,
        num_workers=legacy.num_workers, batches_in_epoch=legacy.step_in_epoch,
        samples_in_epoch=legacy.samples_in_epoch, sampler=sampler, epoch=legacy.epoch,
        global_step=legacy.global_step, batch_size=legacy.batch_size, drop_last=legacy.drop_last,
        shuffle_seed=legacy.shuffle_seed, next_worker=next_worker,
        workers=tuple(WorkerSummary(w.worker_id, w.samples_streamed, w.position) for w in legacy.workers))


def _describe_sampler(sis: Any, iterable: bool) -> tuple[str, int | None]:
    if not isinstance(sis, dict):
        return ("custom sampler (no batch-sampler state)" if sis is None else "unrecognised sampler state"), None
    samples = sis.get("samples_yielded") if isinstance(sis.get("samples_yielded"), int) else None
    inner = sis.get("sampler_iter_state")
    if isinstance(inner, dict) and "generator" in inner:
        gen = inner["generator"]
        try:
            raw = bytes(gen.tolist())
            seed = int.from_bytes(raw[:8], "little")
            fresh = gen.equal(generator_state(seed))
        except Exception:  # noqa: BLE001 - an odd generator must not break a summary
            return f"RandomSampler, {inner.get('yielded')} indices drawn, unreadable generator", samples
        where = f"generator freshly seeded {seed}" if fresh else \
            f"generator state sha256 {hashlib.sha256(raw).hexdigest()[:12]}"
        return f"RandomSampler, {where}, {inner.get('yielded')} indices drawn", samples
    if isinstance(sis.get("sampler_state"), dict):
        return f"stateful sampler (e.g. StatefulDistributedSampler), {sis['sampler_state'].get('yielded')} " \
               "indices drawn", samples
    if iterable:
        return "none: the workers' dataset states hold the positions", samples
    return f"sequential (fast-forward {samples} samples)", samples


def summarize_state(state: Any, *, source: str = "<memory>") -> DataLoaderStateSummary:
    """Describe a torchdata ``StatefulDataLoader`` state dict (as ``loader.state_dict()`` returns it).

    Raises:
        CorruptCheckpointError: ``state`` is not a ``StatefulDataLoader`` state.

    Example:
        >>> summarize_state({"_num_yielded": 2, "_sampler_iter_state": {"samples_yielded": 8},
        ...                  "fetcher_state": None, "dataset_state": None}).batches_in_epoch
        2
    """
    fix = "pass a file holding StatefulDataLoader.state_dict() (torch.save of it), or a legacy loader-state folder"
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"holds a {type(state).__name__}, not a StatefulDataLoader state", path=source,
                                     fix=fix)
    finished = bool(state.get("_iterator_finished", False))
    if "_num_yielded" in state:
        iterable = state.get("fetcher_state") is not None
        sampler, samples = _describe_sampler(state.get("_sampler_iter_state"), iterable)
        try:
            batches = int(state["_num_yielded"])
        except (TypeError, ValueError):
            raise CorruptCheckpointError(f"_num_yielded is {state['_num_yielded']!r}, not a number", path=source,
                                         fix=fix) from None
        return DataLoaderStateSummary(
            source=source, layout="torchdata", dataset_kind="iterable" if iterable else "map", num_workers=0,
            batches_in_epoch=batches, samples_in_epoch=samples, sampler=sampler,
            workers=(WorkerSummary(0, None, state.get("dataset_state")),), finished=finished)
    snap = state.get("_snapshot")
    if not isinstance(snap, dict) or not isinstance(snap.get("_main_snapshot"), dict):
        raise CorruptCheckpointError("not a StatefulDataLoader state (no _num_yielded, no _snapshot)", path=source,
                                     fix=fix)
    main = snap["_main_snapshot"]
    wsnaps = snap.get("_worker_snapshots")
    try:
        n = int(main["_num_workers"])
        since = int(state.get("_steps_since_snapshot", 0))
        batches = int(snap["_snapshot_step"]) + since
        last = int(snap["_last_yielded_worker_id"])
        if not isinstance(wsnaps, dict) or len(wsnaps) != n:
            raise ValueError(f"_worker_snapshots for _num_workers {n}")
        workers = []
        iterable = False
        for i in range(n):
            w = wsnaps[f"worker_{i}"]
            iterable = iterable or w.get("fetcher_state") is not None
            workers.append(WorkerSummary(i, None, w.get("dataset_state")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"a StatefulDataLoader snapshot without a readable {exc}", path=source,
                                     fix=fix) from None
    sampler, samples = _describe_sampler(main.get("_sampler_iter_state"), iterable)
    return DataLoaderStateSummary(
        source=source, layout="torchdata", dataset_kind="iterable" if iterable else "map", num_workers=n,
        batches_in_epoch=batches, samples_in_epoch=samples, sampler=sampler, workers=tuple(workers),
        next_worker=(last + 1 + since) % n if n else None, finished=finished)
