"""Convert a legacy data-loader state into torchdata's ``StatefulDataLoader`` state.

Older training releases saved where the data loader stood as one global record plus one file per
worker (the layout is described in :mod:`tensorparity.dataloader._legacy` and
``docs/dataloader-state.md``). :func:`convert_dataloader_state` turns that folder into the dict
``StatefulDataLoader.load_state_dict`` takes, written atomically with ``torch.save``, so that a
resumed run yields exactly the batches the interrupted one would have yielded next; it restarts
a real ``StatefulDataLoader`` from the file before installing it. :func:`inspect_dataloader_state`
describes either side.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from tensorparity._atomic import atomic_output
from tensorparity._output import check_output, write_failure
from tensorparity.dataloader._build import (
    DatasetStateFn,
    build_state,
    resolve_sampler,
    summarize_legacy,
    summarize_state,
)
from tensorparity.dataloader._dataloader_report import DataLoaderStateConversion, DataLoaderStateSummary
from tensorparity.dataloader._legacy import (
    GLOBAL_NAME,
    LegacyLoaderState,
    load_plain,
    read_legacy_loader_state,
)
from tensorparity.dataloader._verify import torchdata_version, verify_state
from tensorparity.errors import SourceNotFoundError, UsageError

__all__ = ["convert_dataloader_state", "inspect_dataloader_state"]


def _check_output(out: Path, legacy: LegacyLoaderState, *, force: bool) -> None:
    sources = [legacy.path / f"{GLOBAL_NAME}{s}" for s in (".json", ".pt")] + [w.path for w in legacy.workers]
    check_output(out, sources, force, what="the converted state")


def _notes(legacy: LegacyLoaderState, *, num_workers: int, sampler: str | None) -> tuple[str, ...]:
    notes = []
    if num_workers != legacy.num_workers:
        notes.append(f"re-mapped from {legacy.num_workers} to {num_workers} workers: the sample order is the "
                     "sampler's and is kept; randomness drawn inside workers (augmentations) follows the new "
                     "workers' seeds")
    if sampler == "random":
        notes.append(f"this state repeats the rest of epoch {legacy.epoch}; later epochs follow the new loader's "
                     "generator. For the old seed + epoch order in every epoch, convert with sampler 'distributed' "
                     "(StatefulDistributedSampler)")
    if legacy.dataset_kind == "iterable":
        notes.append("each worker's dataset_state is its legacy position; the dataset's load_state_dict must "
                     "accept it (pass dataset_state= in Python to translate)")
    return tuple(notes)


def _serialize(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def convert_dataloader_state(
    legacy: str | os.PathLike[str] | LegacyLoaderState,
    out: str | os.PathLike[str] | None = None,
    *,
    num_workers: int | None = None,
    sampler: str | None = None,
    dataset_state: DatasetStateFn | None = None,
    verify: bool = True,
    force: bool = False,
) -> DataLoaderStateConversion:
    """Build the ``StatefulDataLoader`` state that continues a legacy run, and write it.

    Args:
        legacy: the legacy loader-state folder (or its already-read :class:`LegacyLoaderState`).
        out: where to write the state (``torch.save``, atomic; read it back with
            ``torch.load(out, weights_only=True)``). ``None``: build and verify only.
        num_workers: the new loader's worker count; default the legacy one. Map-style datasets
            may change it (the sampler position is global); iterable ones may not.
        sampler: map-style only: ``"random"`` (``shuffle=True``, the default for a shuffled run),
            ``"distributed"`` (``StatefulDistributedSampler``, which also repeats the legacy order
            in later epochs) or ``"sequential"`` (the default for an unshuffled run).
        dataset_state: iterable only: maps a legacy worker record to the ``dataset_state`` that
            worker's dataset ``load_state_dict`` takes; default: the legacy position as it is.
        verify: restart a real ``StatefulDataLoader`` from the state (needs torchdata) and check
            its next batches against the legacy run before anything is written.
        force: replace an existing ``out``.

    Returns:
        The record; its ``state`` is the dict itself.

    Raises:
        SourceError: the legacy folder is missing, unreadable or inconsistent.
        UsageError: a re-map the dataset does not allow, a sampler that cannot repeat the
            legacy order, an existing output without ``force``, a failed write.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "loader_state.json").write_text(json.dumps({"version": 1, "global_step": 7, "epoch": 1,
        ...     "step_in_epoch": 2, "batch_size": 2, "num_workers": 0, "dataset_kind": "map",
        ...     "dataset_size": 10, "shuffle": True, "shuffle_seed": 42}))
        >>> _ = (d / "worker_0.json").write_text(json.dumps({"worker_id": 0, "epoch": 1, "samples_streamed": 4}))
        >>> conv = convert_dataloader_state(d, d / "state.pt")
        >>> conv.state["_num_yielded"], conv.sampler, conv.verification is not None
        (2, 'random', True)
    """
    state_in = legacy if isinstance(legacy, LegacyLoaderState) else read_legacy_loader_state(legacy)
    workers = state_in.num_workers if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise UsageError(f"num_workers must be an integer, not {workers!r}", fix="pass e.g. num_workers=2")
    target = Path(out) if out is not None else None
    if target is not None:
        _check_output(target, state_in, force=force)
    chosen = resolve_sampler(state_in, sampler)
    state = build_state(state_in, num_workers=workers, sampler=chosen, dataset_state=dataset_state)
    positions = None
    if state_in.dataset_kind == "iterable":
        positions = [state["dataset_state"]] if workers == 0 else \
            [state["_snapshot"]["_worker_snapshots"][f"worker_{i}"]["dataset_state"] for i in range(workers)]

    def check(candidate: dict[str, Any]) -> str:
        if not verify:
            return "not verified (verify=False)"
        if torchdata_version() is None:
            return "not verified: torchdata is not installed (pip install 'tensorparity[dataloader]')"
        return verify_state(state_in, candidate, num_workers=workers, sampler=chosen, dataset_states=positions)

    if target is None:
        verification = check(state)
    else:
        data = _serialize(state)
        try:
            with atomic_output(target) as tmp:
                tmp.write_bytes(data)
                # What the user will load is the file, so the file is what gets proven.
                verification = check(load_plain(tmp, what="a data-loader state"))
        except (OSError, RuntimeError) as exc:
            raise write_failure(exc, "the data-loader state", target, left="nothing was written") from None
    result = summarize_state(state, source=str(target) if target else "<memory>")
    return DataLoaderStateConversion(source=summarize_legacy(state_in), result=result,
                                     sampler=chosen or "none (iterable)",
                                     output=str(target) if target else None, verification=verification,
                                     notes=_notes(state_in, num_workers=workers, sampler=chosen), state=state)


def inspect_dataloader_state(path: str | os.PathLike[str]) -> DataLoaderStateSummary:
    """Describe a data-loader state: a legacy folder, or a ``torch.save`` of a
    ``StatefulDataLoader.state_dict()``.

    Raises:
        SourceError: the path is missing, unreadable, or holds neither kind of state.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "s.pt"
        >>> torch.save({"_num_yielded": 3, "_sampler_iter_state": {"samples_yielded": 12},
        ...             "fetcher_state": None, "dataset_state": None}, p)
        >>> inspect_dataloader_state(p).samples_in_epoch
        12
    """
    p = Path(path)
    if p.is_dir() or p.name in (f"{GLOBAL_NAME}.json", f"{GLOBAL_NAME}.pt"):
        return summarize_legacy(read_legacy_loader_state(p))
    if not p.exists():
        raise SourceNotFoundError("no such file or folder", path=p,
                                  fix="give a legacy loader-state folder or a saved StatefulDataLoader state")
    return summarize_state(load_plain(p, what="a data-loader state"), source=str(p))
