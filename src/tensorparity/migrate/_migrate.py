"""``migrate``: bring a checkpoint to the current version, recorded, verified, atomic.

The checkpoint is opened lazily, its version read, the plan made and applied to its flat entries
without reading tensors (:mod:`._apply`); every problem (a conflict, a mapping that does not
fit, a migration that fails) is raised before anything is written. Then the result streams into
a temporary name beside the output (:func:`~tensorparity._atomic.atomic_output`), one tensor at
a time (:func:`~tensorparity.migrate.write_checkpoint`), is re-opened and compared bitwise with
the plan (untouched tensors against the source itself), and only then renamed into place, so a
crash, a full disk or a failed check leaves the input, and any existing output, as it was.

What was applied (registry, versions, migration names, time, SHA-256 of the source) is recorded
with the output: as the top-level value ``tensorparity_migrations`` of a torch training
checkpoint (Lightning and the like), as the member ``tensorparity_migrations.json`` of a
``.nemo``, beside its config (its weights stay a plain state dict, and ``model_config.yaml`` stays
the source's bytes unless a migration changed the config), as the metadata string
``tensorparity.migrations`` of anything else (safetensors header, a torch zip's tensorparity
record). The next run reads it (and the record earlier versions wrote into a ``.nemo``'s
``model_config.yaml``) and finds nothing to do.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tensorparity._atomic import atomic_output
from tensorparity._output import refuse_existing, write_failure
from tensorparity._version import __version__
from tensorparity.checkpoint import Checkpoint, ValueEntry
from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.format_registry import format_names
from tensorparity.checkpoint.write import (
    NEMO_CONFIG_KEY,
    check_writable,
    family,
    format_for_path,
    payload,
    source_metadata,
    write_checkpoint,
)
from tensorparity.errors import UsageError
from tensorparity.migrate._apply import Applied, apply_plan
from tensorparity.migrate._convert import verify_written
from tensorparity.migrate._migrate_report import Change, MigrateReport, MigrationPlan
from tensorparity.migrate.plan import METADATA_KEY, NEMO_RECORD_KEY, RECORD_KEY, RECORD_SCHEMA, plan_migrations
from tensorparity.migrate.registry import Migration, MigrationError, Registry, load_migrations

__all__ = ["default_output", "migrate"]

_CHUNK = 1 << 20


def default_output(source: str | os.PathLike[str]) -> Path:
    """``<stem>_fixed<ext>`` beside the input (``<name>_fixed`` for a folder).

    Example:
        >>> default_output("runs/epoch=3.ckpt").as_posix(), default_output("runs/dcp_step_10").name
        ('runs/epoch=3_fixed.ckpt', 'dcp_step_10_fixed')
    """
    path = Path(source)
    if path.is_dir() or not path.suffix:
        return path.with_name(f"{path.name}_fixed")
    return path.with_name(f"{path.stem}_fixed{path.suffix}")


def _sha256(path: Path) -> str | None:
    """The source's hash: its bytes, or for a folder every file's relative path and bytes."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _record(plan: MigrationPlan, ckpt: Checkpoint, *, sha256: str | None) -> dict[str, Any]:
    return {"registry": plan.registry, "from": plan.version, "to": plan.target, "direction": plan.direction,
            "migrations": [{"name": s.name, "version": s.version, "direction": s.direction} for s in plan.steps],
            "applied_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(ckpt.source), "format": ckpt.format, "sha256": sha256},
            "tool": f"tensorparity {__version__}"}


def _finish(ckpt: Checkpoint, applied: Applied, plan: MigrationPlan, registry: Registry, fmt: str,
            record: dict[str, Any]) -> tuple[Checkpoint, dict[str, str], list[Change]]:
    """The checkpoint to write: applied entries, the new version in its field, and the record."""
    entries = dict(applied.entries)
    metadata = source_metadata(ckpt)
    if fmt.startswith("safetensors"):
        metadata.pop("format", None)  # the writer sets "pt"
    changes: list[Change] = []
    if registry.set_version_field:
        for name in registry.version_field:
            old = entries.get(name)
            if isinstance(old, ValueEntry) and old.value != plan.target:
                entries[name] = ValueEntry(name, plan.target)
                changes.append(Change("(version field)", "changed", name, detail=f"{old.value!r} -> {plan.target!r}"))
                break
            if old is None and name in metadata:
                changes.append(Change("(version field)", "changed", name, detail=f"metadata {metadata[name]!r} -> "
                                                                              f"{plan.target!r}"))
                metadata[name] = plan.target
                break
    text = json.dumps({"schema": RECORD_SCHEMA, "history": [*plan.history, record]}, sort_keys=True)
    metadata.pop(METADATA_KEY, None)
    if fmt == "torch" and (ckpt.sections or RECORD_KEY in entries):
        entries[RECORD_KEY] = ValueEntry(RECORD_KEY, text)  # beside epoch/global_step, where people look
    elif fmt == "nemo" and NEMO_CONFIG_KEY in metadata:
        # A .nemo's weights stay a plain state dict and its config the model's: the record is a
        # member of its own. An old-style record inside the config moves out of it; otherwise
        # model_config.yaml is rewritten only when a migration changed the config.
        entries.pop(NEMO_RECORD_KEY, None)
        entries[RECORD_KEY] = ValueEntry(RECORD_KEY, text)
        if _config_changed(ckpt, entries):
            metadata[NEMO_CONFIG_KEY] = _nemo_config(metadata[NEMO_CONFIG_KEY], ckpt, entries)
        else:
            del metadata[NEMO_CONFIG_KEY]  # the writer copies the source's bytes
    else:
        entries.pop(RECORD_KEY, None)
        metadata[METADATA_KEY] = text
    sections = dict(ckpt.sections)
    sections.pop(RECORD_KEY, None)  # a .nemo's record member is written apart; in other formats it is a value
    if fmt == "nemo" and RECORD_KEY in entries:
        sections[RECORD_KEY] = "records"
    out = Checkpoint(source=ckpt.source, format=ckpt.format, entries=entries, sections=sections,
                     provenance=ckpt.provenance, notes=ckpt.notes, default_section=ckpt.default_section,
                     structure=ckpt.structure)
    return out, metadata, changes


def _config_changed(ckpt: Checkpoint, entries: dict[str, Any]) -> bool:
    """Whether the planned entries add, change or remove a ``model_config.`` value of ``ckpt``."""
    prefix = "model_config."
    return (any(k.startswith(prefix) and k not in entries for k in ckpt)
            or any(k.startswith(prefix) and ckpt.get(k) is not e for k, e in entries.items()))


def _nemo_config(text: str, ckpt: Checkpoint, entries: dict[str, Any]) -> str:
    """``model_config.yaml`` with the values the migrations set, added or removed under ``model_config.``."""
    import yaml

    config = yaml.safe_load(text) or {}
    prefix = "model_config."
    for key in [k for k in ckpt if k.startswith(prefix) and k not in entries]:
        _edit(config, key[len(prefix):].split("."), None, delete=True)
    for key, entry in entries.items():
        if key.startswith(prefix) and ckpt.get(key) is not entry:
            _edit(config, key[len(prefix):].split("."), entry.value)
    return str(yaml.safe_dump(config, sort_keys=False))


def _slot(node: Any, part: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return int(part)
    if isinstance(node, dict):
        return int(part) if part not in node and part.isdigit() and int(part) in node else part
    return None


def _edit(node: Any, parts: list[str], value: Any, *, delete: bool = False) -> None:
    """Set (or delete) the value at a dotted path of a nested config; a container a delete
    empties goes too, as it does in the torch writer (a flat key cannot say it was there)."""
    slot = _slot(node, parts[0])
    if slot is None:
        if delete:
            return
        raise MigrationError(f"cannot set model_config.{'.'.join(parts)}: its parent is not a mapping",
                             key="model_config." + ".".join(parts), fix="set the whole value of its parent instead")
    if len(parts) == 1:
        if delete and isinstance(node, dict):
            node.pop(slot, None)
        elif delete:
            node.pop(slot)
        else:
            node[slot] = value
        return
    if isinstance(node, dict) and slot not in node:
        if delete:
            return
        node[slot] = {}
    _edit(node[slot], parts[1:], value, delete=delete)
    if delete and isinstance(node[slot], (dict, list)) and not node[slot]:
        node.pop(slot)


def _destination(ckpt: Checkpoint, source: Any, *, output: Any, in_place: bool, overwrite: bool) -> Path:
    is_path = isinstance(source, (str, os.PathLike)) and Path(ckpt.source).exists()
    if in_place:
        if output is not None:
            raise UsageError("--in-place and -o/--output both name where to write", fix="pass one of them")
        if not is_path:
            raise UsageError("only a checkpoint on disk can be migrated in place", fix="pass output=PATH")
        return Path(ckpt.source)
    if output is None:
        if not is_path:
            raise UsageError("a checkpoint that is not a file needs an output path", fix="pass output=PATH (-o)")
        dest = default_output(ckpt.source)
    else:
        dest = Path(output)
    if is_path and dest.exists() and os.path.samefile(dest, ckpt.source):
        raise UsageError("the output is the input itself", path=dest,
                         fix="pass --in-place to replace it atomically, or choose another output path")
    refuse_existing(dest, overwrite)
    return dest


def migrate(
    source: Any,
    migrations: Registry | Iterable[Migration] | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    backup: bool | str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    target: str | None = None,
    from_version: str | None = None,
    format: str | None = None,  # noqa: A002 - the CLI's word
    overwrite: bool = False,
    verify: bool = True,
) -> MigrateReport:
    """Migrate a checkpoint to the registry's current version (or ``target``).

    Args:
        source: the checkpoint (a path; or anything :func:`tensorparity.open` takes, with ``output``).
        migrations: a :class:`Registry`, a list of :class:`Migration`, or what ``--migrations``
            takes: ``pkg.mod[:NAME]``, ``file.py[:NAME]`` or ``spec.yaml``.
        output: where to write; default ``<stem>_fixed<ext>`` beside the input.
        in_place: replace the input atomically (temporary file beside it, fsync, rename, fsync
            of the folder).
        backup: with ``in_place``, keep the original: ``True`` for ``<name>.bak``, or a path.
        dry_run: make the plan and list every change, write nothing.
        target: the version to reach (default: the registry's ``current``); an older one is a
            downgrade through inverses.
        from_version: the checkpoint's version, when it records none (or records it wrong).
        format: the output format (one of :data:`tensorparity.migrate.FORMATS`); default: the
            output's suffix, else the input's own format.
        overwrite: replace an existing ``output``.
        verify: re-open the output and compare it bitwise with the plan before installing it.

    Returns:
        A :class:`~tensorparity.migrate._migrate_report.MigrateReport` (verdict ``migrated``, ``dry run``
        or ``up to date``).

    Raises:
        MigrationError: the version cannot be found, a migration fails, or writing failed (the
            input and any existing output untouched, nothing left behind).
        ConflictError: two migrations write one key (before anything is written).
        DowngradeError: the checkpoint is newer than the target and an inverse is missing.
        MappingError: a migration's mapping does not fit the checkpoint.

    Example:
        >>> import tempfile, torch, tensorparity
        >>> from tensorparity.mapping import Mapping, Rule
        >>> path = tempfile.mkdtemp() + "/old.pt"
        >>> torch.save({"release": "1.0", "model": {"dec.w": torch.ones(2)}}, path)
        >>> reg = Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("model.dec.{p}", "model.head.{p}")]))],
        ...                version_field="release")
        >>> migrate(path, reg).summary()[:70]
        'migrated 1.0 -> 2.0 through 1 migration: 1 renamed, 1 changed; written'
        >>> migrate(path[:-3] + "_fixed.pt", reg).verdict
        'up to date'
    """
    start = time.perf_counter()
    if backup and not in_place:
        raise UsageError("a backup is kept only when migrating in place", fix="add --in-place, or drop --backup")
    writable = format_names(writable=True)  # asked now: a format registered after import counts
    if format is not None and format not in writable:
        raise UsageError(f"unknown output format {format!r}", fix=f"use one of {', '.join(writable)}")
    registry = load_migrations(migrations)
    ckpt = open_checkpoint(source)
    owned = ckpt is not source
    try:
        plan = plan_migrations(ckpt, registry, target=target, from_version=from_version)
        if plan.up_to_date:
            return MigrateReport(plan, dry_run=dry_run, seconds=time.perf_counter() - start)
        dest = None if dry_run else _destination(ckpt, source, output=output, in_place=in_place, overwrite=overwrite)
        applied = apply_plan(ckpt, plan)  # every conflict and misfit, before a byte is written
        fmt = format or (format_for_path(dest) if dest is not None and not in_place else None) or family(ckpt)
        sha = None if dry_run else _sha256(Path(ckpt.source))
        record = _record(plan, ckpt, sha256=sha)
        planned, metadata, extra = _finish(ckpt, applied, plan, registry, fmt, record)
        check_writable(payload(planned), fmt, dest or Path(str(ckpt.source)))  # a dry run says so too
        changes = applied.changes + tuple(extra)
        tensors = list(planned.tensors())
        made = sum(1 for e in tensors if applied.origin.get(e.key) is None)
        common = dict(plan=plan, changes=changes, format=fmt, record=record, notes=applied.notes)
        if dest is None:
            return MigrateReport(**common, dry_run=True, seconds=time.perf_counter() - start)  # type: ignore[arg-type]
        backup_path = None
        if backup:
            backup_path = Path(backup) if not isinstance(backup, bool) else dest.with_name(dest.name + ".bak")
        verification = None
        try:
            with atomic_output(dest, backup=backup_path) as tmp:
                write_checkpoint(planned, tmp, format=fmt, metadata=metadata)
                if verify:
                    verification = verify_written(planned, tmp)
                    if verification.verdict != "identical":
                        raise MigrationError(f"the written checkpoint does not read back as planned "
                                             f"({verification.classic_summary()}); nothing was written", path=dest,
                                             fix="a function that computes tensors must be deterministic; "
                                                 "otherwise please report this")
        except (OSError, RuntimeError, KeyboardInterrupt) as exc:
            # torch's zip writer reports a failed write (a full disk, Ctrl-C) as a RuntimeError
            raise write_failure(exc, "the migrated checkpoint", dest, error=MigrationError,
                                left="the input is untouched and nothing was left behind") from None
        return MigrateReport(**common, output=str(dest), in_place=in_place,  # type: ignore[arg-type]
                             backup=str(backup_path) if backup_path else None, verification=verification,
                             untouched=len(tensors) - made, made=made, seconds=time.perf_counter() - start)
    finally:
        if owned:
            ckpt.close()
