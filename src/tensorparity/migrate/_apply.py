"""Apply a plan to a checkpoint's flat entries, lazily: nothing is read but metadata (and what a
migration function reads on purpose), nothing is written.

Mapping steps go through :func:`tensorparity.mapping.apply_mapping` (keys it does not claim stay
as they are); function steps edit a :class:`~tensorparity.migrate.nested.Tree`. Each key keeps
its *origin*: the source key whose bytes it still holds untouched (renamed or moved or copied
tensors keep theirs; a transformed or set one has none). Migrations of one version are first
run apart, on the same input, and any key two of them write is a conflict, reported before
anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any

from tensorparity.checkpoint import Checkpoint, Entry, TensorEntry, ValueEntry
from tensorparity.errors import TensorParityError
from tensorparity.mapping import apply_mapping
from tensorparity.migrate._migrate_report import Change, MigrationPlan, PlanStep
from tensorparity.migrate.nested import Tree
from tensorparity.migrate.registry import ConflictError, Migration, MigrationError, Version
from tensorparity.report._render import short_repr

__all__ = ["Applied", "apply_plan"]


@dataclass(frozen=True)
class Applied:
    """The plan applied: the new entries (lazy), each key's origin, the changes, and notes."""

    entries: dict[str, Entry]
    origin: dict[str, str | None]
    changes: tuple[Change, ...]
    notes: tuple[str, ...]


@dataclass
class _State:
    entries: dict[str, Entry]
    origin: dict[str, str | None]


def _rekey(entry: Entry, key: str) -> Entry:
    if entry.key == key:
        return entry
    return ValueEntry(key, entry.value) if isinstance(entry, ValueEntry) else replace(entry, key=key)


def _describe(entry: Entry) -> str:
    if isinstance(entry, TensorEntry):
        return f"tensor {list(entry.shape)} {str(entry.dtype).removeprefix('torch.')}"
    return short_repr(entry.value, 60)


def _mapping_step(state: _State, ckpt: Checkpoint, m: Migration, notes: list[str]) -> tuple[_State, list[Change]]:
    assert m.mapping is not None
    view = Checkpoint(source=ckpt.source, format=ckpt.format, entries=state.entries, sections=ckpt.sections,
                      default_section=ckpt.default_section)
    res = apply_mapping(view, m.mapping)
    if res.unused_rules:
        notes.append(f"migration {m.name!r}: {len(res.unused_rules)} rule(s) of its mapping matched no key "
                     f"({', '.join(res.mapping.rules[i].short() for i in res.unused_rules)})")
    # Targets made from one group of sources, in the order the planner made them.
    groups: dict[tuple[str, ...], list[str]] = {}
    for target, sources in res.claims.items():
        groups.setdefault(sources, []).append(target)
    first = {sources[0]: sources for sources in groups}
    ignored, unmapped = set(res.ignored), set(res.unmapped)
    entries: dict[str, Entry] = {}
    origin: dict[str, str | None] = {}
    changes: list[Change] = []
    clashes: list[str] = []

    def put(key: str, entry: Entry, source: str | None) -> None:
        if key in entries:
            clashes.append(key)
        entries[key], origin[key] = entry, source

    for key, entry in state.entries.items():
        if key in ignored:
            changes.append(Change(m.name, "removed", key, detail=_describe(entry)))
        elif key in unmapped:
            put(key, entry, state.origin[key])  # outside the mapping's prefix: stays as it is
        elif key in first:
            sources = first[key]
            targets = groups[sources]
            i = res.rule_of[targets[0]]
            rule = res.mapping.rules[i] if i is not None else None
            if rule is None or rule.transform is None:  # renames, one source per target
                for src, target in zip(sources, targets):
                    put(target, _rekey(state.entries[src], target), state.origin[src])
                    if target != src:
                        changes.append(Change(m.name, "renamed", target, (src,)))
            else:
                for target in targets:
                    put(target, res.checkpoint[target], None)
                    changes.append(Change(m.name, "transformed", target, sources, rule.transform.describe()))
    if clashes:
        raise ConflictError(f"migration {m.name!r} ({m.version}) produces {', '.join(map(repr, clashes[:5]))}, which "
                            f"the checkpoint already holds outside its mapping", key=clashes[0],
                            fix="ignore (drop) the old key in the mapping, or rename to another key")
    return _State(entries, origin), changes


def _function_step(state: _State, m: Migration, version: str | None) -> tuple[_State, list[Change]]:
    assert m.function is not None
    tree = Tree(state.entries, version=version, migration=f"migration {m.name!r} ({m.version})")
    try:
        m.function(tree)
    except TensorParityError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function: any failure is one line, nothing written
        raise MigrationError(f"migration {m.name!r} ({m.version}) raised {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}",
                             fix="fix the migration's function (nothing was written)") from exc
    origin = dict(state.origin)
    before = state.entries
    changes: list[Change] = []
    for edit in tree.edits:
        if edit.kind == "move":
            assert edit.source is not None
            origin[edit.key] = origin.pop(edit.source, None)
            changes.append(Change(m.name, "renamed", edit.key, (edit.source,)))
        elif edit.kind == "copy":
            assert edit.source is not None
            origin[edit.key] = origin.get(edit.source)
            changes.append(Change(m.name, "copied", edit.key, (edit.source,), "same data"))
        elif edit.kind == "delete":
            origin.pop(edit.key, None)
            old = before.get(edit.key)
            changes.append(Change(m.name, "removed", edit.key, detail=_describe(old) if old else ""))
        else:
            for k in [k for k in origin if k == edit.key or k.startswith(edit.key + ".")]:
                origin[k] = None
            new = tree.entries.get(edit.key)
            old = before.get(edit.key)
            if old is not None and new is not None:
                if not (isinstance(old, ValueEntry) and isinstance(new, ValueEntry) and _equal(old.value, new.value)):
                    changes.append(Change(m.name, "changed", edit.key, detail=f"{_describe(old)} -> {_describe(new)}"))
            else:
                changes.append(Change(m.name, "added", edit.key, detail=_describe(new) if new else "a subtree"))
    entries = tree.entries
    for k in entries:
        origin.setdefault(k, None)
    return _State(entries, {k: origin[k] for k in entries}), changes


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - odd values: treat as changed
        return False


def _run(state: _State, ckpt: Checkpoint, step: PlanStep, version: str | None,
         notes: list[str]) -> tuple[_State, list[Change]]:
    m: Migration = step.migration
    changes: list[Change] = []
    if m.mapping is not None:
        state, made = _mapping_step(state, ckpt, m, notes)
        changes += made
    if m.function is not None:
        state, made = _function_step(state, m, version)
        changes += made
    return state, changes


def _writes(before: _State, after: _State) -> set[str]:
    """Keys a step wrote: added, replaced (another entry object) or removed."""
    out = {k for k, e in after.entries.items() if before.entries.get(k) is not e}
    out.update(k for k in before.entries if k not in after.entries)
    return out


def _check_conflicts(state: _State, ckpt: Checkpoint, steps: Sequence[PlanStep], version: str | None) -> None:
    writes = []
    for step in steps:
        after, _ = _run(state, ckpt, step, version, [])
        writes.append((step, _writes(state, after)))
    found = []
    for i, (a, wa) in enumerate(writes):
        for b, wb in writes[i + 1:]:
            both = sorted(wa & wb)
            if both:
                found.append(f"{a.name!r} and {b.name!r} both write {', '.join(map(repr, both[:3]))}"
                             + (f" and {len(both) - 3} more" if len(both) > 3 else ""))
    if found:
        raise ConflictError(f"conflicting migrations of version {steps[0].version}: {'; '.join(found)} (nothing was "
                            f"written)", fix="merge them into one migration, or give them different versions so "
                                             "that their order is defined")


def apply_plan(ckpt: Checkpoint, plan: MigrationPlan) -> Applied:
    """Apply every step of ``plan`` to ``ckpt``'s entries, lazily; raise before anything is written.

    Raises:
        ConflictError: two migrations of one version write the same key, or a mapping produces
            a key the checkpoint already holds.
        MappingError: a migration's mapping does not fit the checkpoint.
        MigrationError: a migration's function failed.

    Example:
        >>> import torch, tensorparity
        >>> from tensorparity.migrate import Migration, Registry, plan_migrations
        >>> from tensorparity.mapping import Mapping, Rule
        >>> reg = Registry("d", [Migration("2.0", "rename", mapping=Mapping([Rule("w", "weight")]))],
        ...                default_version="1.0")
        >>> ckpt = tensorparity.open({"w": torch.ones(1), "b": torch.ones(1)})
        >>> applied = apply_plan(ckpt, plan_migrations(ckpt, reg))
        >>> applied.origin, [c.text() for c in applied.changes]
        ({'weight': 'w', 'b': 'b'}, ['w -> weight'])
    """
    state = _State(dict(ckpt.items()), {k: k for k in ckpt})
    changes: list[Change] = []
    notes: list[str] = []
    version: str | None = plan.version
    for _, group in groupby(plan.steps, key=lambda s: (Version(s.version), s.direction)):
        steps = list(group)
        if len(steps) > 1:
            _check_conflicts(state, ckpt, steps, version)
        for step in steps:
            state, made = _run(state, ckpt, step, version, notes)
            changes += made
        version = steps[0].version
    return Applied(state.entries, state.origin, tuple(changes), tuple(notes))
