"""Migrate and convert checkpoints without ever losing the original.

Everything written here goes through :func:`atomic_output` (a temporary name beside the
destination, fsync, rename, fsync of the folder) and the streaming :func:`write_checkpoint`
(one tensor in memory at a time). :func:`convert` rewrites a checkpoint in another format and
verifies the result bitwise against the source; :func:`migrate` applies the versioned migrations
of a :class:`Registry` (mappings and small functions over a :class:`Tree`) newer than the
checkpoint's version, records them inside the output and verifies every untouched tensor. (Data-loader state has its own package, :mod:`tensorparity.dataloader`.)
"""

from __future__ import annotations

from tensorparity._atomic import atomic_output, clean_stale
from tensorparity.checkpoint.write import FORMATS, parse_size, write_checkpoint
from tensorparity.migrate._convert import ConvertReport, convert
from tensorparity.migrate._migrate import migrate
from tensorparity.migrate._migrate_report import Change, MigrateReport, MigrationPlan
from tensorparity.migrate.functions import delete_keys, move_keys, recompute_last_epoch, set_values, tie_weights
from tensorparity.migrate.nested import Tree
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

__all__ = [
    "Change",
    "ConflictError",
    "ConvertReport",
    "DowngradeError",
    "FORMATS",
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
    "delete_keys",
    "load_migrations",
    "migrate",
    "migration",
    "move_keys",
    "parse_size",
    "plan_migrations",
    "read_history",
    "recompute_last_epoch",
    "set_values",
    "tie_weights",
    "write_checkpoint",
]
