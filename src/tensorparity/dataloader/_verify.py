"""Prove a converted state by restarting a real ``StatefulDataLoader`` from it.

Map-style: the dataset is replaced by its indices (sample ``i`` is ``i``), the loader is built
as the user will build theirs (same batch size, sampler, ``drop_last`` and workers), restored,
and its next batches must be exactly the next slices of the legacy epoch's index order.
Iterable: every worker's dataset is a stand-in that echoes the position it was restored with,
so the next batches must come from the expected workers, in order, each from its own position.
A mismatch is a bug in tensorparity (or a torchdata whose state rules changed), never the
user's input, so it raises :class:`~tensorparity.errors.InternalError`.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from tensorparity.dataloader._build import legacy_order
from tensorparity.dataloader._legacy import LegacyLoaderState
from tensorparity.errors import InternalError

__all__ = ["torchdata_version", "verify_state"]

_TIMEOUT_S = 120  # a worker that never answers must not hang the command
MAX_VERIFY_SIZE = 1 << 26  # the check draws the whole permutation, as torchdata's RandomSampler does


def torchdata_version() -> str | None:
    """The installed torchdata's version, or ``None`` when it is not installed.

    Example:
        >>> isinstance(torchdata_version(), (str, type(None)))
        True
    """
    try:
        from importlib.metadata import version

        import torchdata.stateful_dataloader as _sdl
    except ImportError:
        return None
    del _sdl  # only its presence matters
    try:
        return version("torchdata")
    except Exception:  # noqa: BLE001 - an odd install still has the module
        return "unknown"


class _Indices(Dataset[int]):
    """Sample ``i`` is ``i``: a batch is the list of dataset indices the sampler picked."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def position_code(position: Any) -> int:
    """A 32-bit fingerprint of a position (stable across processes).

    Example:
        >>> position_code({"shard": 1, "offset": 2}) == position_code({"offset": 2, "shard": 1})
        True
    """
    return zlib.crc32(json.dumps(position, sort_keys=True, default=repr).encode())


class _PositionEcho(IterableDataset[torch.Tensor]):
    """Each worker yields ``[worker_id, fingerprint of the state it was restored with]``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.code = -1

    def state_dict(self) -> dict[str, Any]:
        return {"code": self.code}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.code = position_code(state)

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for _ in range(self.limit):
            yield torch.tensor([worker, self.code])


def _restore(dataset: Any, state: dict[str, Any], *, legacy: LegacyLoaderState, num_workers: int,
             sampler: str | None, batches: int) -> list[torch.Tensor]:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    kwargs: dict[str, Any] = {"batch_size": legacy.batch_size, "num_workers": num_workers}
    if num_workers:
        kwargs["timeout"] = _TIMEOUT_S
    if legacy.dataset_kind == "map":
        kwargs["drop_last"] = legacy.drop_last
        if sampler == "random":
            kwargs["shuffle"] = True
        elif sampler == "distributed":
            s = StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=legacy.shuffle,
                                           seed=legacy.shuffle_seed or 0)
            s.set_epoch(legacy.epoch)
            kwargs["sampler"] = s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's own deprecation chatter is not the user's business
        loader = StatefulDataLoader(dataset, **kwargs)
        loader.load_state_dict(state)
        it = iter(loader)
        try:
            out = []
            for _ in range(batches):
                try:
                    out.append(next(it))
                except StopIteration:
                    break
            return out
        finally:
            del it, loader  # shuts the workers down now, not at some later collection


def _fail(what: str) -> InternalError:
    return InternalError(f"the converted data-loader state did not restart torchdata {torchdata_version()} as "
                         f"expected: {what} (please report)")


def verify_state(legacy: LegacyLoaderState, state: dict[str, Any], *, num_workers: int, sampler: str | None,
                 dataset_states: list[Any] | None = None) -> str:
    """Restart a real ``StatefulDataLoader`` from ``state`` and check what it yields next.

    Args:
        legacy: the legacy layout the state was built from.
        state: the built state.
        num_workers: the new loader's workers.
        sampler: the new loader's sampler (map-style).
        dataset_states: iterable datasets: each worker's expected ``dataset_state``.

    Returns:
        What was checked, in words.

    Raises:
        InternalError: the restarted loader did not yield what the legacy run would have.

    Example:
        >>> from pathlib import Path
        >>> from tensorparity.dataloader._build import build_state
        >>> from tensorparity.dataloader._legacy import LegacyLoaderState, LegacyWorker
        >>> s = LegacyLoaderState(path=Path("."), version=1, global_step=1, epoch=0, step_in_epoch=1,
        ...     batch_size=2, drop_last=False, shuffle=True, shuffle_seed=3, num_workers=0,
        ...     dataset_kind="map", dataset_size=6, worker_seed=None,
        ...     workers=(LegacyWorker(0, 0, 2, None, Path("w")),))
        >>> state = build_state(s, num_workers=0, sampler="random")
        >>> verify_state(s, state, num_workers=0, sampler="random").split(" yields ")[1]
        "the legacy epoch's next 2 batches, index for index"
    """
    readers = max(num_workers, 1)
    if legacy.dataset_kind == "map":
        assert legacy.dataset_size is not None
        if legacy.dataset_size > MAX_VERIFY_SIZE:
            return (f"not verified: {legacy.dataset_size:,} indices are more than the check draws "
                    f"({MAX_VERIFY_SIZE:,}); the state was built by the same rules as verified smaller ones")
        order, bs = legacy_order(legacy), legacy.batch_size
        per_epoch = legacy.dataset_size // bs if legacy.drop_last else math.ceil(legacy.dataset_size / bs)
        remaining = per_epoch - legacy.step_in_epoch
        k = legacy.step_in_epoch
        want = [order[j * bs:(j + 1) * bs].tolist() for j in range(k, k + min(remaining, readers + 3))]
        got = _restore(_Indices(legacy.dataset_size), state, legacy=legacy, num_workers=num_workers,
                       sampler=sampler, batches=len(want) + (len(want) == remaining))
        got_lists = [b.tolist() for b in got]
        if got_lists != want:
            raise _fail(f"next batches {got_lists} instead of the legacy epoch's {want}")
        if not want:
            return (f"a StatefulDataLoader restored from it (torchdata {torchdata_version()}, {num_workers} workers) "
                    "ends the epoch, as the legacy run had finished it")
        return (f"a StatefulDataLoader restored from it (torchdata {torchdata_version()}, {num_workers} workers) "
                f"yields the legacy epoch's next {len(want)} batches, index for index")
    codes = [position_code(s) for s in dataset_states or []]
    start = legacy.step_in_epoch % readers
    want_rows = [[(start + j) % readers, codes[(start + j) % readers]] for j in range(readers)]
    got = _restore(_PositionEcho(limit=legacy.batch_size), state, legacy=legacy, num_workers=num_workers,
                   sampler=None, batches=readers)
    got_rows = [b[0].tolist() for b in got]
    if got_rows != want_rows or any(not bool((b == b[0]).all()) for b in got):
        raise _fail(f"(worker, position fingerprint) {got_rows} instead of {want_rows}")
    return (f"a StatefulDataLoader restored from it (torchdata {torchdata_version()}, {num_workers} workers) "
            f"restarts every worker at its own position, next batch from worker {start}")
