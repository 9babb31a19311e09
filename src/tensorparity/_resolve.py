"""Resolve what a user names by string, ``package.module:NAME`` or ``path/to/file.py:NAME``, to the
object it names: the one implementation behind model factories, input and loss functions,
training recipes, Lightning legs, migration registries and migration functions.

The part after the colon may be dotted (``pkg.models:Registry.build``). Importing runs the
user's own module on purpose (it is their code, not a checkpoint's), so nothing read from a
checkpoint is ever resolved. A file's own folder goes first on ``sys.path`` while it is imported;
for a module the current folder goes last (installed packages still win). Every failure is one
:class:`FactoryError` line (or the caller's own :class:`UsageError` subclass) naming the string
and the fix, worded with what the string names (``factory``, ``recipe``, ``migrations``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tensorparity.errors import UsageError

__all__ = ["FactoryError", "FactorySpec", "PackageNotInstalledError", "parse_factory", "resolve_object"]

_FORMS = "'package.module:function', 'package.module:Class' or 'path/to/file.py:function'"


class FactoryError(UsageError):
    """A model factory could not be resolved, called, or did not return an ``nn.Module``."""


class PackageNotInstalledError(FactoryError):
    """The top-level package of a ``module:function`` factory is not installed (or, for a
    ``.nemo`` file, NeMo is not).

    Attributes:
        package: the missing top-level package (``nemo`` for ``nemo.collections.asr:build``).
        factory: the factory string.
    """

    def __init__(self, package: str, factory: str, *, fix: str | None = None, noun: str = "factory") -> None:
        self.package, self.factory = package, factory
        super().__init__(f"{noun} {factory!r}: package {package!r} is not installed",
                         fix=fix or f"install {package} into this environment (pip install ...), or run from the "
                                    f"folder that holds the {package!r} package")


@dataclass(frozen=True)
class FactorySpec:
    """A parsed factory string.

    Attributes:
        text: the string as given.
        module: the dotted module name, or ``None`` for a file.
        path: the Python file, or ``None`` for a module.
        attribute: the dotted attribute path after the colon.
    """

    text: str
    module: str | None
    path: Path | None
    attribute: str


def _bad(spec: str, why: str, noun: str = "factory") -> FactoryError:
    return FactoryError(f"{noun} {spec!r} {why}",
                        fix=f"write {_FORMS}, e.g. mypkg.models:build_model (or name a .nemo file or a "
                            f"Hugging Face model folder holding config.json)")


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse_factory(spec: str, *, noun: str = "factory", default_attribute: str | None = None) -> FactorySpec:
    """Split a factory string at its last colon and check both halves.

    ``noun`` names the thing in messages (``factory``, ``recipe``, ``migrations``); with a
    ``default_attribute``, a string without ``:NAME`` names that attribute of the module or file.

    A module part that ends in ``.py`` or contains a path separator is a file (the last colon is
    the separator, so ``C:\\models\\m.py:make`` works too).

    Example:
        >>> parse_factory("tensorparity.examples:reference_model").module
        'tensorparity.examples'
        >>> parse_factory("models/port.py:make").path.name
        'port.py'
    """
    if not isinstance(spec, str):
        raise FactoryError(f"a factory must be a string, an nn.Module or a callable, not {type(spec).__name__}",
                           fix=f"pass {_FORMS}")
    text = spec.strip()
    where, colon, attribute = text.rpartition(":")
    if default_attribute is not None and (not colon or "/" in attribute or os.sep in attribute
                                          or attribute.endswith(".py")):
        where, colon, attribute = text, ":", default_attribute
    if not colon:
        raise _bad(spec, "has no ':' between the module and the function", noun)
    if not where:
        raise _bad(spec, "names no module before the ':'", noun)
    if not _is_identifier_path(attribute):
        raise _bad(spec, f"has {attribute!r} after the ':', which is not a (dotted) Python name", noun)
    if where.endswith(".py") or "/" in where or os.sep in where:
        return FactorySpec(spec, None, Path(where), attribute)
    if not _is_identifier_path(where):
        raise _bad(spec, f"has {where!r} before the ':', which is neither a dotted module name nor a .py file", noun)
    return FactorySpec(spec, where, None, attribute)


@contextmanager
def _on_path(folder: Path | None, *, first: bool) -> Iterator[None]:
    """Put a folder on ``sys.path`` while a factory is imported and called: a factory file's
    own folder first (it imports its siblings the way ``python file.py`` would let it); the
    current folder last for ``module:function`` (the ``tensorparity`` script, unlike
    ``python -m``, does not see the project it is run from; installed packages still win)."""
    entry = str(folder) if folder is not None else None
    if entry is None or entry in sys.path or (not first and "" in sys.path):
        yield
        return
    if first:
        sys.path.insert(0, entry)
    else:
        sys.path.append(entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:  # the user's code removed it already
            pass


def _import_file(spec: FactorySpec, noun: str) -> ModuleType:
    assert spec.path is not None
    path = spec.path.expanduser()
    if not path.is_file():
        raise FactoryError(f"{noun} {spec.text!r}: no such Python file", path=path,
                           fix="check the path (relative paths start from the current folder)")
    resolved = path.resolve()
    # One module per file, whatever the spelling of its path: MODEL and --reference may share a file.
    name = f"_tensorparity_factory_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"{noun} {spec.text!r}: cannot import this file", path=path,
                           fix="name a Python source file ending in .py")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import(spec: FactorySpec, noun: str) -> ModuleType:
    if spec.path is not None:
        return _import_file(spec, noun)
    assert spec.module is not None
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        top = spec.module.split(".")[0]
        if exc.name == top:
            raise PackageNotInstalledError(top, spec.text, noun=noun) from None
        if exc.name and (exc.name == spec.module or spec.module.startswith(exc.name + ".")):
            raise FactoryError(f"{noun} {spec.text!r}: package {top!r} has no module {exc.name!r}",
                               fix="check the spelling of the module path") from None
        raise FactoryError(f"{noun} {spec.text!r}: importing {spec.module!r} needs {exc.name!r}, which is not "
                           f"installed", fix=f"install {exc.name} (a dependency of {top})") from None


def _attribute(module: ModuleType, spec: FactorySpec, noun: str) -> Any:
    obj: Any = module
    for depth, part in enumerate(spec.attribute.split(".")):
        if not hasattr(obj, part):
            where = spec.module or str(spec.path)
            if depth == 0:
                public = getattr(module, "__all__", None)
                names = [n for n in public if callable(getattr(module, n, None))] if isinstance(public, (list, tuple)) \
                    else [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                          and getattr(v, "__module__", None) == module.__name__]
                hint = f"it defines {', '.join(sorted(names)[:6])}" if names else "it defines no function or class"
                raise FactoryError(f"{noun} {spec.text!r}: {where!r} has no attribute {part!r}",
                                   fix=f"name one of its functions or classes ({hint})")
            raise FactoryError(f"{noun} {spec.text!r}: {'.'.join(spec.attribute.split('.')[:depth])!r} has no "
                               f"attribute {part!r}", fix="check the spelling of the attribute path")
        obj = getattr(obj, part)
    return obj


def resolve_object(text: str, *, noun: str = "factory", error: type[UsageError] = FactoryError,
                   default_attribute: str | None = None, folder: Path | None = None) -> Any:
    """Import what a ``package.module:NAME`` or ``path/to/file.py:NAME`` string names and return
    it, uncalled: the one resolution of a user's object by name (model factories, input and loss
    functions, recipes, migration registries and functions all go through here).

    A file's own folder goes first on ``sys.path`` while it is imported (it imports its siblings
    as ``python file.py`` would let it); for a module the current folder goes last.

    Args:
        text: the string.
        noun: what it names, in messages (``factory``, ``recipe``, ``migrations``, ``function``).
        error: the :class:`UsageError` subclass raised (a missing top-level package stays a
            :class:`PackageNotInstalledError` when ``error`` is :class:`FactoryError`).
        default_attribute: the attribute a string without ``:NAME`` names.
        folder: where a relative ``.py`` path starts (default: the current folder).

    Raises:
        ``error``: the string is malformed, the module, file or attribute does not exist, or
            importing raised (the exception's type and message, on one line).

    Example:
        >>> resolve_object("tensorparity.examples:reference_model").__name__
        'reference_model'
    """
    try:
        spec = parse_factory(text, noun=noun, default_attribute=default_attribute)
        if spec.path is not None and folder is not None and not spec.path.expanduser().is_absolute():
            spec = FactorySpec(spec.text, None, folder / spec.path, spec.attribute)
        home = spec.path.expanduser().resolve().parent if spec.path is not None else Path.cwd()
        with _on_path(home, first=spec.path is not None):
            try:
                return _attribute(_import(spec, noun), spec, noun)
            except (UsageError, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - importing ran the user's module: any failure is one line
                detail = " ".join(str(exc).split())[:300]
                raise FactoryError(f"importing the {noun} {text!r} raised {type(exc).__name__}"
                                   + (f": {detail}" if detail else ""),
                                   fix="fix the error in that module (import it in Python to see the traceback)"
                                   ) from exc
    except FactoryError as exc:
        if error is FactoryError or isinstance(exc, error):
            raise
        raise error(exc.message, path=exc.path, key=exc.key, fix=exc.fix) from exc.__cause__
