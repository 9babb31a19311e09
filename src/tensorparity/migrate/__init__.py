"""Migrate and convert checkpoints, and data-loader state, without ever losing the original.

Everything written here goes through :func:`atomic_output` (a temporary name beside the
destination, fsync, rename, fsync of the folder) and the streaming :func:`write_checkpoint`
(one tensor in memory at a time). :func:`convert` rewrites a checkpoint in another format and
verifies the result bitwise against the source; :func:`migrate` applies the versioned migrations
of a :class:`Registry` (mappings and small functions over a :class:`Tree`) newer than the
checkpoint's version, records them inside the output and verifies every untouched tensor;
:func:`convert_dataloader_state` turns a legacy loader state into torchdata's
``StatefulDataLoader`` state.
"""

from __future__ import annotations

from tensorparity._output import atomic_output, clean_stale
from tensorparity.migrate._dataloader_report import DataLoaderStateConversion, DataLoaderStateSummary
from tensorparity.migrate._legacy_loader import LegacyLoaderState, read_legacy_loader_state
from tensorparity.migrate.convert import ConvertReport, convert
from tensorparity.migrate.dataloader_state import convert_dataloader_state, inspect_dataloader_state
from tensorparity.migrate.functions import delete_keys, move_keys, recompute_last_epoch, set_values, tie_weights
from tensorparity.migrate.migrate import migrate
from tensorparity.migrate.plan import plan_migrations, read_history
from tensorparity.migrate.registry import (
    ConflictError,
    DowngradeError,
    Migration,
    MigrationError,
    Registry,
    Version,
    load_migrations,
    migration,
)
from tensorparity.migrate.tree import Tree
from tensorparity.migrate.writers import FORMATS, parse_size, write_checkpoint
from tensorparity.report.migrate import Change, MigrateReport, MigrationPlan

__all__ = [
    "Change",
    "ConflictError",
    "ConvertReport",
    "DataLoaderStateConversion",
    "DataLoaderStateSummary",
    "DowngradeError",
    "FORMATS",
    "LegacyLoaderState",
    "MigrateReport",
    "Migration",
    "MigrationError",
    "MigrationPlan",
    "Registry",
    "Tree",
    "Version",
    "atomic_output",
    "clean_stale",
    "convert",
    "convert_dataloader_state",
    "delete_keys",
    "inspect_dataloader_state",
    "load_migrations",
    "migrate",
    "migration",
    "move_keys",
    "parse_size",
    "plan_migrations",
    "read_history",
    "read_legacy_loader_state",
    "recompute_last_epoch",
    "set_values",
    "tie_weights",
    "write_checkpoint",
]
