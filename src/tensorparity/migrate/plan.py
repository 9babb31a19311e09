"""Which migrations a checkpoint needs: read its version, then order the migrations newer than it.

The version comes from, in this order: ``from_version`` when the caller states it; the record
tensorparity wrote inside the checkpoint when it migrated it before (for the same registry);
the registry's version fields (Lightning's ``pytorch-lightning_version``, a NeMo config field
such as ``model_config.release``, a safetensors metadata name); the registry's
``default_version``. A checkpoint newer than the target is a downgrade: it goes down through
the inverses of the migrations on the way, and is refused when one has none.
"""

from __future__ import annotations

import json
from typing import Any

from tensorparity.checkpoint import Checkpoint, TensorEntry, ValueEntry
from tensorparity.checkpoint.layout import RECORD_KEY
from tensorparity.checkpoint.layout import RECORD_METADATA_KEY as METADATA_KEY
from tensorparity.checkpoint.write import source_metadata
from tensorparity.migrate._migrate_report import MigrationPlan, PlanStep
from tensorparity.migrate.registry import DowngradeError, MigrationError, Registry, Version, _version_text

__all__ = ["METADATA_KEY", "NEMO_RECORD_KEY", "RECORD_KEY", "RECORD_SCHEMA", "plan_migrations", "read_history", "read_version"]

# RECORD_KEY: a top-level value of a torch training checkpoint, and what a .nemo's member
# tensorparity_migrations.json opens as.
# METADATA_KEY: a metadata string everywhere else (safetensors header, torch zip record).
NEMO_RECORD_KEY = "model_config." + RECORD_KEY  # where earlier versions put a .nemo's record: still read
RECORD_SCHEMA = "tensorparity.migration-record/1"


def _metadata(ckpt: Checkpoint) -> dict[str, str]:
    return source_metadata(ckpt)


def read_history(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The migrations tensorparity recorded inside a checkpoint, oldest first (``[]`` when none).

    Example:
        >>> import tensorparity
        >>> read_history(tensorparity.open({"w": __import__("torch").ones(1)}))
        []
    """
    entry = ckpt.get(RECORD_KEY) or ckpt.get(NEMO_RECORD_KEY)
    text = entry.value if isinstance(entry, ValueEntry) else _metadata(ckpt).get(METADATA_KEY)
    if text is None:
        return []
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA or not isinstance(data.get("history"), list):
        raise MigrationError("the migration record inside the checkpoint is not a tensorparity record",
                             path=ckpt.source, key=RECORD_KEY,
                             fix="remove the damaged record, and state the version with --from")
    return [h for h in data["history"] if isinstance(h, dict)]


def _field(ckpt: Checkpoint, name: str, metadata: dict[str, str]) -> tuple[Any, str] | None:
    entry = ckpt.get(name)
    if isinstance(entry, TensorEntry):
        raise MigrationError(f"version field {name!r} holds a tensor, not a version", path=ckpt.source, key=name,
                             fix="point version_field at the key that holds the release number")
    if isinstance(entry, ValueEntry):
        return entry.value, f"field {name!r}"
    if name in metadata:
        return metadata[name], f"metadata {name!r}"
    return None


def read_version(ckpt: Checkpoint, registry: Registry) -> tuple[str | None, str, tuple[dict[str, Any], ...]]:
    """``(version, where it was read, history)`` of a checkpoint under a registry's rules.

    Example:
        >>> import tensorparity
        >>> reg = Registry("demo", version_field="pytorch-lightning_version")
        >>> read_version(tensorparity.open({"pytorch-lightning_version": "2.4.0", "state_dict": {}}), reg)[:2]
        ('2.4.0', "field 'pytorch-lightning_version'")
    """
    history = tuple(read_history(ckpt))
    mine = [h for h in history if h.get("registry") == registry.name and isinstance(h.get("to"), str)]
    if mine:
        return mine[-1]["to"], "tensorparity's record of the last migration", history
    metadata = _metadata(ckpt) if registry.version_field else {}
    for name in registry.version_field:
        found = _field(ckpt, name, metadata)
        if found is not None:
            value, where = found
            try:
                return _version_text(value, f"version field {name!r}"), where, history
            except MigrationError as exc:
                raise MigrationError(exc.message, path=ckpt.source, key=name,
                                     fix="fix the field, or state the checkpoint's version with --from") from None
    if registry.default_version is not None:
        return registry.default_version, "the registry's default_version (the checkpoint records none)", history
    return None, "", history


def plan_migrations(ckpt: Checkpoint, registry: Registry, *, target: str | None = None,
                    from_version: str | None = None) -> MigrationPlan:
    """The migrations that bring ``ckpt`` from its version to ``target`` (default: the registry's current).

    Raises:
        MigrationError: the checkpoint's version cannot be found, or a version is not a version.
        DowngradeError: the checkpoint is newer than the target, and a migration on the way down
            has no inverse (or the checkpoint is newer than every migration this code knows).

    Example:
        >>> import torch, tensorparity
        >>> from tensorparity.migrate import Migration
        >>> reg = Registry("demo", [Migration("2.0", "tie", function=print)], version_field="release")
        >>> plan_migrations(tensorparity.open({"release": "1.0", "model": {"w": torch.ones(1)}}), reg).summary()
        '1.0 -> 2.0: 1 migration (tie 2.0)'
    """
    if not registry.migrations:
        raise MigrationError(f"registry {registry.name!r} holds no migrations", path=registry.source,
                             fix="add at least one migration")
    goal = _version_text(target, "target") if target is not None else registry.current
    assert goal is not None
    if from_version is not None:
        version, origin, history = (_version_text(from_version, "from_version"), "stated (--from)",
                                    tuple(read_history(ckpt)))
    else:
        version, origin, history = read_version(ckpt, registry)
    if version is None:
        fields = ", ".join(repr(f) for f in registry.version_field) or "(no version_field configured)"
        raise MigrationError(f"the checkpoint records no version: none of {fields} is in it, and it holds no "
                             f"tensorparity record for {registry.name!r}", path=ckpt.source,
                             fix="state its version with --from VERSION (from_version=), or set default_version in "
                                 "the registry")
    now, goal_v = Version(version), Version(goal)
    if now < goal_v:
        steps = tuple(PlanStep(m.name, m.version, "up", m.kinds, m.description or m.describe(), m)
                      for m in registry.between(version, goal))
    elif now > goal_v:
        steps = _downgrade(ckpt, registry, version, goal)
    else:
        steps = ()
    return MigrationPlan(source=str(ckpt.source), registry=registry.name, registry_source=registry.source,
                         version=version, version_origin=origin, target=goal, steps=steps, history=history,
                         version_field=registry.version_field)


def _downgrade(ckpt: Checkpoint, registry: Registry, version: str, goal: str) -> tuple[PlanStep, ...]:
    newest = registry.migrations[-1]
    if Version(version) > newest.key:
        raise DowngradeError(f"the checkpoint is at version {version}, newer than every migration this code knows "
                             f"(the newest is {newest.version}); refusing to downgrade it to {goal}",
                             path=ckpt.source, fix="use the release that wrote it, or migrations that know "
                                                   f"{version} and define inverses")
    down = registry.between(goal, version)
    missing = [m for m in down if not m.invertible]
    if missing:
        names = ", ".join(f"{m.name!r} ({m.version})" for m in missing)
        raise DowngradeError(f"the checkpoint is at version {version}, newer than the target {goal}; going down needs "
                             f"the inverse of {names}, which {'is' if len(missing) == 1 else 'are'} not defined",
                             path=ckpt.source, fix="define `inverse` for those migrations (inverse: auto inverts a "
                                                   "mapping), or keep the checkpoint at its version")
    steps = []
    for m in reversed(down):
        inverse = m.inverted()
        steps.append(PlanStep(inverse.name, m.version, "down", inverse.kinds, inverse.description or inverse.describe(),
                              inverse))
    return tuple(steps)
