"""Migrate and convert checkpoints without ever losing the original.

Everything written here goes through :func:`atomic_output` (a temporary name beside the
destination, fsync, rename, fsync of the folder) and the streaming :func:`write_checkpoint`
(one tensor in memory at a time). :func:`convert` rewrites a checkpoint in another format and
verifies the result bitwise against the source.
"""

from __future__ import annotations

from tensorparity.migrate.atomic import atomic_output, clean_stale
from tensorparity.migrate.convert import ConvertReport, convert
from tensorparity.migrate.writers import FORMATS, parse_size, write_checkpoint

from tensorparity.migrate.functions import (  # noqa: E402 - migrations (registry, plan, migrate)
    delete_keys,
    move_keys,
    recompute_last_epoch,
    set_values,
    tie_weights,
)
from tensorparity.migrate.migrate import migrate  # noqa: E402
from tensorparity.migrate.plan import plan_migrations, read_history  # noqa: E402
from tensorparity.migrate.registry import (  # noqa: E402
    ConflictError,
    DowngradeError,
    Migration,
    MigrationError,
    Registry,
    Version,
    load_migrations,
    migration,
)
from tensorparity.migrate.tree import Tree  # noqa: E402
from tensorparity.report.migrate import Change, MigrateReport, MigrationPlan  # noqa: E402
from tensorparity.migrate._dataloader_report import (  # noqa: E402 - data-loader state
    DataLoaderStateConversion,
    DataLoaderStateSummary,
)
from tensorparity.migrate._legacy_loader import LegacyLoaderState, read_legacy_loader_state  # noqa: E402
from tensorparity.migrate.dataloader_state import convert_dataloader_state, inspect_dataloader_state  # noqa: E402

__all__ = [
    "FORMATS",
    "ConvertReport",
    "atomic_output",
    "clean_stale",
    "convert",
    "parse_size",
    "write_checkpoint",
    # migrations
    "Change",
    "ConflictError",
    "DowngradeError",
    "MigrateReport",
    "Migration",
    "MigrationError",
    "MigrationPlan",
    "Registry",
    "Tree",
    "Version",
    "delete_keys",
    "load_migrations",
    "migrate",
    "migration",
    "move_keys",
    "plan_migrations",
    "read_history",
    "recompute_last_epoch",
    "set_values",
    "tie_weights",
    # data-loader state
    "DataLoaderStateConversion",
    "DataLoaderStateSummary",
    "LegacyLoaderState",
    "convert_dataloader_state",
    "inspect_dataloader_state",
    "read_legacy_loader_state",
]
