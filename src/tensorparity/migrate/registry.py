"""Migrations as data: :class:`Migration` records, a :class:`Registry` of them, and loading one from
a Python module (``pkg.mod`` or ``pkg.mod:NAME``), a Python file (``file.py[:NAME]``) or a YAML
spec (``spec.yaml``).

A migration upgrades a checkpoint *to* its ``version``. It is a mapping (renames, transforms,
splits, merges and drops, exactly as :mod:`tensorparity.mapping` defines them; no second rename
engine) and/or a small pure function over the checkpoint's flat tree (:class:`~.tree.Tree`).
It may carry an ``inverse`` (``"auto"``: its mapping inverted), which is what a downgrade needs.

Importing a Python module or file runs that code on purpose: it is the user's own migrations,
like a model factory (:mod:`tensorparity._factory`), and never anything read from a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import total_ordering
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tensorparity._resolve import resolve_object
from tensorparity.errors import TensorParityError, UsageError
from tensorparity.mapping import MappingError, load_mapping

if TYPE_CHECKING:
    from tensorparity.mapping import Mapping
    from tensorparity.migrate.nested import Tree  # noqa: F401 - named in a string annotation

__all__ = ["ConflictError", "DowngradeError", "Migration", "MigrationError", "Registry", "Version", "load_migrations",
           "migration"]

MigrationFunction = Callable[["Tree"], None]
_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:[._-]?(dev|a|alpha|b|beta|c|rc|pre|preview|post)[._-]?(\d*))?(?:\+[\w.]*)?",
                      re.IGNORECASE)
_PRE_RANK = {"dev": -4, "a": -3, "alpha": -3, "b": -2, "beta": -2, "c": -1, "rc": -1, "pre": -1, "preview": -1,
             "post": 1}
DEFAULT_ATTRIBUTE = "MIGRATIONS"


class MigrationError(UsageError):
    """A migration is wrong, does not fit the checkpoint, or failed; nothing was written."""


class ConflictError(MigrationError):
    """Two migrations of one version write the same key: their order would decide the result."""


class DowngradeError(MigrationError):
    """The checkpoint is newer than the target and a migration on the way down has no inverse."""


@total_ordering
@dataclass(frozen=True)
class Version:
    """A release number compared the way people mean it: ``2.0 == 2.0.0 < 2.1rc1 < 2.1 < 2.10``.

    Attributes:
        text: the version as written.

    Example:
        >>> Version("1.9.0rc1") < Version("1.9") < Version("1.10") == Version("1.10.0")
        True
    """

    text: str
    _key: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = str(self.text).strip()
        m = _VERSION.fullmatch(text)
        if not m:
            raise MigrationError(f"{self.text!r} is not a version number",
                                 fix="write versions as numbers with dots, e.g. '2.0' or '1.9.0rc1' (quoted in YAML)")
        release = [int(p) for p in m.group(1).split(".")]
        while len(release) > 1 and release[-1] == 0:
            release.pop()  # 2.0.0 == 2.0 == 2
        tag = (m.group(2) or "").lower()
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "_key", (tuple(release), _PRE_RANK.get(tag, 0), int(m.group(3) or 0)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key == other._key

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __str__(self) -> str:
        return self.text


def _version_text(value: Any, what: str) -> str:
    if isinstance(value, bool) or isinstance(value, float):
        raise MigrationError(f"{what} is the number {value!r}, not a version (YAML reads an unquoted 1.10 as 1.1)",
                             fix=f"quote the version, e.g. '{value}'")
    if not isinstance(value, (str, int)):
        raise MigrationError(f"{what} must be a version string, not {type(value).__name__}", fix="write e.g. '2.0'")
    return str(Version(str(value)))


@dataclass(frozen=True)
class Migration:
    """One versioned upgrade: a mapping and/or a pure function over the checkpoint tree.

    The mapping runs first (every key it does not claim stays as it is: passthrough is implied,
    drop keys with ``ignore_a``), then the function.

    Attributes:
        version: the version a checkpoint is at after this migration.
        name: a short unique name, recorded in the output.
        mapping: renames, transforms, splits, merges, drops (:class:`tensorparity.mapping.Mapping`).
        function: ``function(tree)`` edits a :class:`~tensorparity.migrate.nested.Tree` in place.
        inverse: what undoes it, for downgrades: ``"auto"`` (the mapping inverted; a migration
            with a function needs an explicit inverse), or a :class:`Migration`.
        description: one line for humans.
        source: the file it was defined in.

    Example:
        >>> from tensorparity.mapping import Mapping, Rule
        >>> m = Migration("2.0", "rename-head", mapping=Mapping([Rule("decoder.{p}", "head.{p}")]), inverse="auto")
        >>> m.kinds, m.inverted().mapping.map_key("head.weight")
        (('mapping',), ['decoder.weight'])
    """

    version: str
    name: str
    mapping: Mapping | None = None
    function: MigrationFunction | None = field(default=None, compare=False)
    inverse: Migration | Literal["auto"] | None = field(default=None, compare=False)
    description: str = ""
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", _version_text(self.version, f"migration {self.name!r} version"))
        if not isinstance(self.name, str) or not self.name.strip():
            raise MigrationError(f"migration {self.version} has no name", fix="give every migration a short name")
        if self.mapping is not None:
            object.__setattr__(self, "mapping", load_mapping(self.mapping))
        if self.function is not None and not callable(self.function):
            raise MigrationError(f"migration {self.name!r}: function is a {type(self.function).__name__}, not callable",
                                 fix="pass a function that takes the tree: def fix(tree): ...")
        if self.mapping is None and self.function is None:
            raise MigrationError(f"migration {self.name!r} ({self.version}) has neither a mapping nor a function",
                                 fix="give it a mapping (renames, transforms), a function, or both")
        if self.inverse == "auto" and self.function is not None:
            raise MigrationError(f"migration {self.name!r}: inverse 'auto' inverts a mapping, but it also has a function",
                                 fix="give an explicit inverse (a Migration with the undoing mapping/function)")
        if self.inverse is not None and self.inverse != "auto" and not isinstance(self.inverse, Migration):
            raise MigrationError(f"migration {self.name!r}: inverse must be 'auto' or a Migration, "
                                 f"not {type(self.inverse).__name__}", fix="write inverse='auto' for a mapping")

    @property
    def key(self) -> Version:
        return Version(self.version)

    @property
    def kinds(self) -> tuple[str, ...]:
        """What it is made of: ``mapping``, ``function``, or both."""
        return tuple(k for k, v in (("mapping", self.mapping), ("function", self.function)) if v is not None)

    @property
    def invertible(self) -> bool:
        return self.inverse is not None

    def inverted(self) -> Migration:
        """The migration that undoes this one. Raises :class:`DowngradeError` without an inverse."""
        if self.inverse is None:
            raise DowngradeError(f"migration {self.name!r} ({self.version}) has no inverse, so it cannot be undone",
                                 fix="define its inverse (inverse: auto for a mapping), or keep the newer version")
        if self.inverse == "auto":
            assert self.mapping is not None
            try:
                mapping = self.mapping.inverted()
            except MappingError as exc:
                raise DowngradeError(f"migration {self.name!r} ({self.version}): inverse 'auto' fails: "
                                     f"{' '.join(str(exc).split())}",
                                     fix="give an explicit inverse mapping") from None
            return Migration(self.version, f"undo {self.name}", mapping=mapping, description=self.description,
                             source=self.source)
        return replace(self.inverse, version=self.version, name=self.inverse.name or f"undo {self.name}")

    def describe(self) -> str:
        """One line: what it does.

        Example:
            >>> Migration("1.1", "fix", function=lambda tree: None, description="recompute").describe()
            'recompute (function)'
        """
        parts = []
        if self.mapping is not None:
            m = self.mapping
            parts.append(f"mapping of {len(m.rules)} rule{'s' if len(m.rules) != 1 else ''}"
                         + (f", drops {', '.join(m.ignore_a)}" if m.ignore_a else ""))
        if self.function is not None:
            parts.append("function")
        return f"{self.description} ({', '.join(parts)})" if self.description else ", ".join(parts)


def migration(version: str, *, name: str | None = None, description: str = "",
              inverse: Migration | Literal["auto"] | None = None) -> Callable[[MigrationFunction], Migration]:
    """Decorator: turn a tree function into a :class:`Migration`.

    Example:
        >>> @migration("2.0", description="recompute the scheduler's epoch")
        ... def scheduler_epoch(tree):
        ...     tree.set("scheduler.last_epoch", tree.value("global_step") // 10)
        >>> scheduler_epoch.name, scheduler_epoch.version
        ('scheduler_epoch', '2.0')
    """

    def wrap(function: MigrationFunction) -> Migration:
        doc = (function.__doc__ or "").strip().splitlines()
        return Migration(version, name or function.__name__, function=function, inverse=inverse,
                         description=description or (doc[0] if doc else ""))

    return wrap


@dataclass(frozen=True)
class Registry:
    """The versioned migrations of one project, and where a checkpoint's version is read from.

    Attributes:
        name: the project's name; recorded with each migration, and the tensorparity record of
            one registry never decides the version of another.
        migrations: the migrations, in any order; they are sorted by version (stably).
        version_field: checkpoint keys holding the version, tried in order: Lightning's
            ``pytorch-lightning_version``, a NeMo config field (``model_config.release``), a
            safetensors metadata name. The record tensorparity writes counts too.
        set_version_field: write the new version into the field after migrating.
        default_version: the version of a checkpoint that has no version at all.
        current: the version this code writes (the default target); default: the newest migration's.
        source: the file it was loaded from.

    Example:
        >>> reg = Registry("demo", [Migration("2.0", "b", function=print), Migration("1.5", "a", function=print)])
        >>> [m.name for m in reg.migrations], reg.current
        (['a', 'b'], '2.0')
    """

    name: str
    migrations: tuple[Migration, ...] = ()
    version_field: tuple[str, ...] = ()
    set_version_field: bool = True
    default_version: str | None = None
    current: str | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.version_field, str):
            object.__setattr__(self, "version_field", (self.version_field,))
        migrations = tuple(self.migrations)
        bad = [type(m).__name__ for m in migrations if not isinstance(m, Migration)]
        if bad:
            raise MigrationError(f"registry {self.name!r} holds a {bad[0]}, not a Migration",
                                 fix="list Migration objects (or functions decorated with @migration)")
        names = [m.name for m in migrations]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise MigrationError(f"registry {self.name!r}: migration name(s) {', '.join(map(repr, twice))} used twice",
                                 fix="give every migration its own name (it is recorded in the output)")
        object.__setattr__(self, "migrations", tuple(sorted(migrations, key=lambda m: m.key)))
        for attr in ("default_version", "current"):
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, _version_text(value, attr))
        if self.current is None and migrations:
            object.__setattr__(self, "current", self.migrations[-1].version)

    @property
    def versions(self) -> tuple[str, ...]:
        """The distinct versions, oldest first."""
        out: list[str] = []
        for m in self.migrations:
            if not out or Version(out[-1]) != m.key:
                out.append(m.version)
        return tuple(out)

    def between(self, low: str | None, high: str) -> tuple[Migration, ...]:
        """The migrations with ``low < version <= high``, oldest first (``low=None``: from the start).

        Example:
            >>> reg = Registry("d", [Migration(v, f"m{v}", function=print) for v in ("1.0", "1.5", "2.0")])
            >>> [m.version for m in reg.between("1.0", "2.0")]
            ['1.5', '2.0']
        """
        lo, hi = (Version(low) if low is not None else None), Version(high)
        return tuple(m for m in self.migrations if (lo is None or m.key > lo) and m.key <= hi)

    def get(self, name: str) -> Migration:
        """The migration of that name."""
        for m in self.migrations:
            if m.name == name:
                return m
        raise MigrationError(f"registry {self.name!r} has no migration {name!r}",
                             fix=f"name one of {', '.join(m.name for m in self.migrations)}")


# --- loading -------------------------------------------------------------------------------------

def _from_object(obj: Any, *, label: str, name: str) -> Registry:
    if callable(obj) and not isinstance(obj, (Registry, Migration)):
        try:
            obj = obj()
        except TensorParityError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: any failure is one line
            raise MigrationError(f"calling {label} raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                                 fix="fix the error in that code (run it in Python for the traceback)") from exc
    if isinstance(obj, Registry):
        return obj
    if isinstance(obj, Migration):
        obj = [obj]
    if isinstance(obj, (list, tuple)):
        return Registry(name, tuple(obj), source=label)
    raise MigrationError(f"{label} is a {type(obj).__name__}, not a Registry or a list of Migrations",
                         fix=f"define {DEFAULT_ATTRIBUTE} = Registry(...) (or a list of Migration) in it")


def _import_python(text: str) -> Registry:
    """``pkg.mod[:NAME]`` or ``file.py[:NAME]``, resolved as model factories are."""
    where, colon, attribute = text.rpartition(":")
    if not colon or "/" in attribute or attribute.endswith(".py"):
        where, attribute = text, DEFAULT_ATTRIBUTE
    is_file = where.endswith(".py") or "/" in where
    if not is_file and not all(p.isidentifier() for p in where.split(".")):
        raise MigrationError(f"--migrations {text!r} is neither a module name, a .py file nor a .yaml spec",
                             fix="pass e.g. mypkg.migrations, migrations.py or migrations.yaml")
    obj = resolve_object(text, noun="migrations", error=MigrationError, default_attribute=DEFAULT_ATTRIBUTE)
    default = (Path(where).stem if is_file else where) or "migrations"
    return _from_object(obj, label=f"{where}:{attribute}", name=str(default))


def load_migrations(source: Registry | Iterable[Migration] | str | Path) -> Registry:
    """A :class:`Registry` from a registry, a list of migrations, or what ``--migrations`` takes:
    ``pkg.mod`` / ``pkg.mod:NAME``, ``file.py`` / ``file.py:NAME`` (default name ``MIGRATIONS``),
    or a YAML spec ``spec.yaml`` (see ``docs/migrate.md``).

    Raises:
        MigrationError: the source cannot be found, imported or parsed, or what it holds is wrong.

    Example:
        >>> from importlib.resources import files
        >>> load_migrations(str(files("tensorparity.examples") / "old_release.yaml")).current
        '2.0'
    """
    if isinstance(source, Registry):
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.endswith((".yaml", ".yml")):
            from tensorparity.migrate._spec import registry_from_yaml  # lazy: the YAML loader builds Registry

            return registry_from_yaml(Path(text))
        return _import_python(text)
    try:
        items = tuple(source)
    except TypeError:
        raise MigrationError(f"migrations must be a Registry, a list of Migration or a path, "
                             f"not {type(source).__name__}", fix="pass e.g. 'migrations.yaml'") from None
    return Registry("migrations", items)
