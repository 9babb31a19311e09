"""Load a registry of migrations from a YAML spec, checking everything first.

Every problem (unknown fields, versions that are not versions, bad mappings, unknown steps,
functions that cannot be imported) is collected with its line and reported together, before
any checkpoint is opened. The schema::

    name: my-model                       # recorded with every migration applied
    version_field: release               # checkpoint key(s) holding the version (a list: tried in order)
    set_version_field: true              # write the new version there after migrating
    default_version: '1.0'               # the version of a checkpoint that records none
    current: '2.0'                       # the version this code writes (default: the newest)
    migrations:
      - version: '1.5'
        name: split-qkv
        description: the fused qkv projection became q, k and v
        mapping: {rules: [...], ignore_a: [...]}     # or the path of a mapping file
        inverse: auto                                # or {mapping: ..., steps: ...}
      - version: '2.0'
        name: scheduler-epoch
        steps:                                       # run in order, after the mapping
          - last_epoch: {scheduler: scheduler, steps_per_epoch: 10}
          - tie: {head.weight: embed.weight}
          - call: mypkg.fixes:fix_norms              # or fixes.py:fix_norms (beside the spec)
            args: {eps: 1.0e-5}
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

from tensorparity._resolve import resolve_object
from tensorparity.errors import TensorParityError
from tensorparity.mapping import MappingError
from tensorparity.mapping.loader import _parse, mapping_from_dict, mapping_from_yaml
from tensorparity.migrate.functions import STEPS, TreeFunction
from tensorparity.migrate.nested import Tree
from tensorparity.migrate.registry import Migration, MigrationError, Registry, _version_text

__all__ = ["registry_from_yaml"]

TOP_FIELDS = ("schema", "name", "description", "version_field", "set_version_field", "default_version", "current",
              "migrations")
MIGRATION_FIELDS = ("version", "name", "description", "mapping", "steps", "inverse")
INVERSE_FIELDS = ("name", "description", "mapping", "steps")


class _Problems:
    def __init__(self, source: Path, lines: dict[tuple[Any, ...], int]) -> None:
        self.source, self.lines, self.items = source, lines, []  # type: ignore[var-annotated]

    def add(self, path: tuple[Any, ...], message: str, fix: str) -> None:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        self.items.append((line or 0, f"line {line}: {where + ': ' if where else ''}{message} (fix: {fix})"))

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            text = "; ".join(t for _, t in sorted(self.items, key=lambda item: item[0]))
            raise MigrationError(f"{n} problem{'s' if n != 1 else ''} in the migrations spec, nothing was migrated: "
                                 f"{text}", path=self.source, fix="fix each problem listed")


def _unknown(key: Any, allowed: tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    return f"did you mean {hint[0]!r}?" if hint else f"use only {', '.join(allowed)}"


def _call(spec: str, args: dict[str, Any], folder: Path) -> TreeFunction:
    function = resolve_object(spec, noun="function", error=MigrationError, folder=folder)
    if not callable(function):
        raise MigrationError(f"{spec!r} is a {type(function).__name__}, not a function", fix="name a function(tree)")
    return functools.partial(function, **args) if args else function


def _steps(raw: Any, path: tuple[Any, ...], problems: _Problems, folder: Path) -> TreeFunction | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        problems.add(path, f"steps must be a list, got {raw!r}", "write steps: [{tie: {head.weight: embed.weight}}]")
        return None
    functions: list[TreeFunction] = []
    for i, step in enumerate(raw):
        here = (*path, i)
        if not isinstance(step, dict) or not step:
            problems.add(here, f"a step is a mapping such as {{tie: ...}}, got {step!r}",
                         f"name one of: {', '.join([*STEPS, 'call'])}")
            continue
        kinds = [k for k in step if k in STEPS or k == "call"]
        extra = [k for k in step if k not in STEPS and k not in ("call", "args")]
        if len(kinds) != 1 or extra or ("args" in step and kinds != ["call"]):
            if extra:
                problems.add(here, f"unknown step {extra[0]!r}", _unknown(extra[0], (*STEPS, "call")))
            else:
                problems.add(here, f"{', '.join(map(str, step))} are several steps in one item",
                             "write one step per list item; args goes with call only")
            continue
        kind = kinds[0]
        try:
            if kind == "call":
                args = step.get("args") or {}
                if not isinstance(step["call"], str) or not isinstance(args, dict):
                    raise MigrationError("call takes 'module:function' and args a mapping",
                                         fix="write {call: mypkg.fixes:fix, args: {eps: 1.0e-5}}")
                functions.append(_call(step["call"], args, folder))
            else:
                functions.append(STEPS[kind](step[kind]))
        except TensorParityError as exc:
            problems.add((*here, kind), exc.message, exc.fix or "see docs/migrate.md")
    if len(functions) != len(raw):
        return None
    if len(functions) == 1:
        return functions[0]

    def run_steps(tree: Tree) -> None:
        for function in functions:
            function(tree)

    return run_steps


def _mapping(raw: Any, path: tuple[Any, ...], problems: _Problems, folder: Path, name: str) -> Any:
    if raw is None:
        return None
    try:
        if isinstance(raw, str):
            target = Path(raw) if Path(raw).is_absolute() else folder / raw
            return mapping_from_yaml(target)
        if isinstance(raw, dict):
            return mapping_from_dict({"name": name, **raw}, source=str(problems.source))
        problems.add(path, f"mapping must be a mapping file's path or its fields, got {raw!r}",
                     "write mapping: {rules: [{a: old.{p}, b: new.{p}}]}")
    except MappingError as exc:
        for p in exc.problems:
            problems.add(path, p.message if p.rule is None else f"rules[{p.rule}]: {p.message}", p.fix)
    return None


def _migration(raw: Any, i: int, problems: _Problems, folder: Path) -> Migration | None:
    here: tuple[Any, ...] = ("migrations", i)
    if not isinstance(raw, dict):
        problems.add(here, f"a migration is a mapping with version and name, got {raw!r}",
                     "write - {version: '2.0', name: ..., mapping: ...}")
        return None
    before = len(problems.items)
    for key in raw:
        if key not in MIGRATION_FIELDS:
            problems.add((*here, key), f"unknown field {key!r}", _unknown(key, MIGRATION_FIELDS))
    name = str(raw.get("name") or f"migrations[{i}]")
    mapping = _mapping(raw.get("mapping"), (*here, "mapping"), problems, folder, name)
    function = _steps(raw.get("steps"), (*here, "steps"), problems, folder)
    inverse: Any = raw.get("inverse")
    if isinstance(inverse, dict):
        for key in inverse:
            if key not in INVERSE_FIELDS:
                problems.add((*here, "inverse", key), f"unknown field {key!r}", _unknown(key, INVERSE_FIELDS))
        inv_mapping = _mapping(inverse.get("mapping"), (*here, "inverse", "mapping"), problems, folder, f"undo {name}")
        inv_function = _steps(inverse.get("steps"), (*here, "inverse", "steps"), problems, folder)
        inverse = (inv_mapping, inv_function, inverse.get("name"), inverse.get("description", ""))
    elif inverse not in (None, "auto"):
        problems.add((*here, "inverse"), f"inverse must be 'auto' or a mapping with mapping/steps, got {inverse!r}",
                     "write inverse: auto (inverts the mapping)")
        inverse = None
    if len(problems.items) > before:
        return None
    try:
        if isinstance(inverse, tuple):
            inv_mapping, inv_function, inv_name, inv_description = inverse
            inverse = Migration(raw.get("version"), inv_name or f"undo {raw.get('name')}", mapping=inv_mapping,
                                function=inv_function, description=inv_description)
        return Migration(raw.get("version"), raw.get("name"), mapping=mapping, function=function, inverse=inverse,
                         description=raw.get("description") or "", source=str(problems.source))
    except MigrationError as exc:
        problems.add(here, exc.message, exc.fix or "see docs/migrate.md")
        return None


def registry_from_yaml(path: Path) -> Registry:
    """Load a migrations spec (the schema is in this module's docstring and docs/migrate.md).

    Example:
        >>> from importlib.resources import files
        >>> reg = registry_from_yaml(files("tensorparity.examples") / "old_release.yaml")
        >>> reg.name, reg.versions
        ('reference-model', ('1.5', '2.0'))
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MigrationError("no such migrations spec", path=path, fix="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"cannot read the migrations spec ({exc})", path=path, fix="pass a UTF-8 YAML file") from None
    try:
        data, lines, dups = _parse(text, str(path))
    except MappingError as exc:
        raise MigrationError(exc.problems[0].message, path=path, fix=exc.problems[0].fix) from None
    problems = _Problems(path, lines)
    for p in dups:
        problems.add((), p.message.replace("field", f"line {p.line}: field", 1), p.fix)
    if not isinstance(data, dict):
        problems.add((), f"a migrations spec is a mapping of fields, got {type(data).__name__}",
                     "start with name:, version_field: and migrations:")
        problems.raise_if_any()
    for key in data:
        if key not in TOP_FIELDS:
            problems.add((key,), f"unknown field {key!r}", _unknown(key, TOP_FIELDS))
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.add(("name",), f"name must be text, got {name!r}", "write name: my-model (it is recorded)")
    field = data.get("version_field") or []
    fields = [field] if isinstance(field, str) else field
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        problems.add(("version_field",), f"version_field must be a key or a list of keys, got {field!r}",
                     "write version_field: pytorch-lightning_version")
        fields = []
    if not isinstance(data.get("set_version_field", True), bool):
        problems.add(("set_version_field",), "set_version_field must be true or false", "write set_version_field: true")
    for key in ("default_version", "current"):
        value = data.get(key)
        if value is not None:
            try:
                _version_text(value, key)
            except MigrationError as exc:
                problems.add((key,), exc.message, exc.fix or "quote the version")
    raw = data.get("migrations")
    if not isinstance(raw, list) or not raw:
        problems.add(("migrations",), f"migrations must be a non-empty list, got {raw!r}",
                     "write migrations: [{version: '2.0', name: ..., mapping: ...}]")
        raw = []
    migrations = [m for i, item in enumerate(raw) if (m := _migration(item, i, problems, path.parent)) is not None]
    problems.raise_if_any()
    return Registry(name, tuple(migrations), version_field=tuple(fields),
                    set_version_field=data.get("set_version_field", True),
                    default_version=_text(data.get("default_version")), current=_text(data.get("current")),
                    source=str(path))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
