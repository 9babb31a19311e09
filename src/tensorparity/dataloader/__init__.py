"""Data-loader state: read a legacy loader's saved position and turn it into torchdata's
``StatefulDataLoader`` state, verified by resuming both and comparing the batches they yield.

:func:`convert_dataloader_state` writes the new state (never over an input, atomically, only with
``overwrite=True`` over an existing file); :func:`inspect_dataloader_state` summarises a state
file; :func:`read_legacy_loader_state` reads the legacy layout without executing anything.
"""

from __future__ import annotations

from tensorparity.dataloader._dataloader_report import DataLoaderStateConversion, DataLoaderStateSummary
from tensorparity.dataloader._legacy import LegacyLoaderState, read_legacy_loader_state
from tensorparity.dataloader._state import convert_dataloader_state, inspect_dataloader_state

__all__ = [
    "DataLoaderStateConversion",
    "DataLoaderStateSummary",
    "LegacyLoaderState",
    "convert_dataloader_state",
    "inspect_dataloader_state",
    "read_legacy_loader_state",
]
