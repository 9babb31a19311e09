"""Write a ``torch.distributed.checkpoint`` folder without a process group, one tensor at a time.

``torch.distributed.checkpoint.save`` wants a state dict of tensors in memory. Its planner only
needs their shapes and dtypes to plan, and asks for each tensor's data only when its writer
reaches it (``SavePlanner.resolve_data``). So the state dict handed over holds *meta* tensors
(shape and dtype, no data), and a planner subclass loads the real tensor at ``resolve_data``.
With one writer thread on a CPU-only machine, torch's writer takes tensors one by one
(``_SerialCpuLoader``), so peak memory is about the largest tensor. On a machine with CUDA,
torch picks its overlapping loader, which keeps up to ``per_thread_copy_ahead`` bytes (set to
0 here, which makes it serial too) in flight.

Values (ints, strings, configs) become DCP "bytes" items, ``torch.save``'d by DCP itself.
Parameters come back as plain tensors: DCP does not record ``nn.Parameter``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tensorparity.checkpoint._rebuild import rebuild
from tensorparity.checkpoint._torch_zip_write import load_checked
from tensorparity.checkpoint.tree import Checkpoint, TensorEntry
from tensorparity.errors import UsageError

__all__ = ["METADATA_FILE", "read_dcp_metadata", "write_dcp"]

METADATA_FILE = "tensorparity_metadata.json"


def read_dcp_metadata(folder: Path) -> dict[str, str]:
    """The strings :func:`write_dcp` recorded beside a DCP checkpoint (empty when none)."""
    path = folder / METADATA_FILE
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _planner(lazy: dict[int, TensorEntry]) -> Any:
    from torch.distributed.checkpoint import DefaultSavePlanner

    class LazyPlanner(DefaultSavePlanner):  # type: ignore[misc]
        """Loads each tensor when torch's writer asks for it, not before."""

        def lookup_object(self, index: Any) -> Any:
            found = super().lookup_object(index)
            entry = lazy.get(id(found))
            return load_checked(entry) if entry is not None else found

    return LazyPlanner()


def write_dcp(ckpt: Checkpoint, dest: Path, *, structure: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ckpt`` as a single-process DCP checkpoint folder at ``dest`` (created)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    lazy: dict[int, TensorEntry] = {}

    def meta(entry: TensorEntry) -> torch.Tensor:
        t = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        if entry.requires_grad and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        lazy[id(t)] = entry
        return t

    state = rebuild(ckpt, structure, meta)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UsageError("a DCP checkpoint needs a dict with string keys at the top", path=dest,
                         fix="write torch or safetensors instead")
    dest.mkdir()
    writer = FileSystemWriter(dest, single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is.
            warnings.simplefilter("ignore")
            save(state, storage_writer=writer, planner=_planner(lazy), no_dist=True)
    except CheckpointException as exc:
        # DCP wraps what failed (a full disk, a tensor that could not be read) in a BaseException,
        # which no `except Exception` would catch: hand the first cause on as it was raised.
        causes = [cause for cause, _ in exc.failures.values()]
        raise (causes[0] if causes else RuntimeError(str(exc))) from None
    if metadata:
        (dest / METADATA_FILE).write_text(json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False),
                                          encoding="utf-8")
