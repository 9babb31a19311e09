"""Build a model from what a user names on the command line or passes in Python.

A *factory* is a ``nn.Module`` (used as it is), a zero-argument callable that returns one, or a
string ``module:function`` / ``module:Class`` / ``path/to/file.py:function`` (the part after the
colon may be dotted: ``pkg.models:Registry.build``). Resolving a string imports the module and
calls the function: this runs the user's own code on purpose (it is their model, not the
checkpoint's), so it is never done for anything read from a checkpoint.

Every failure is one :class:`FactoryError` line naming the factory and the fix. A module whose
top-level package is not installed raises :class:`PackageNotInstalledError`, so that a caller
can treat an absent reference implementation as "check the local side only".
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from tensorparity.errors import UsageError

__all__ = ["BuiltModel", "FactoryError", "FactorySpec", "PackageNotInstalledError", "build_model", "parse_factory"]

_FORMS = "'package.module:function', 'package.module:Class' or 'path/to/file.py:function'"


class FactoryError(UsageError):
    """A model factory could not be resolved, called, or did not return an ``nn.Module``."""


class PackageNotInstalledError(FactoryError):
    """The top-level package of a ``module:function`` factory is not installed.

    Attributes:
        package: the missing top-level package (``nemo`` for ``nemo.collections.asr:build``).
        factory: the factory string.
    """

    def __init__(self, package: str, factory: str) -> None:
        self.package, self.factory = package, factory
        super().__init__(f"factory {factory!r}: package {package!r} is not installed",
                         fix=f"install {package} into this environment (pip install ...), or run from the folder "
                             f"that holds the {package!r} package")


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


@dataclass(frozen=True)
class BuiltModel:
    """A model and how it was made.

    Attributes:
        model: the module.
        factory: how it was named (the factory string, or a description of the object passed).
        model_class: ``module.QualName`` of the model's class.
    """

    model: nn.Module
    factory: str
    model_class: str


def _bad(spec: str, why: str) -> FactoryError:
    return FactoryError(f"factory {spec!r} {why}",
                        fix=f"write {_FORMS}, e.g. --model mypkg.models:build_model")


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse_factory(spec: str) -> FactorySpec:
    """Split a factory string at its last colon and check both halves.

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
    if not colon:
        raise _bad(spec, "has no ':' between the module and the function")
    if not where:
        raise _bad(spec, "names no module before the ':'")
    if not _is_identifier_path(attribute):
        raise _bad(spec, f"has {attribute!r} after the ':', which is not a (dotted) Python name")
    if where.endswith(".py") or "/" in where or os.sep in where:
        return FactorySpec(spec, None, Path(where), attribute)
    if not _is_identifier_path(where):
        raise _bad(spec, f"has {where!r} before the ':', which is neither a dotted module name nor a .py file")
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


def _import_file(spec: FactorySpec) -> ModuleType:
    assert spec.path is not None
    path = spec.path.expanduser()
    if not path.is_file():
        raise FactoryError(f"factory {spec.text!r}: no such Python file", path=path,
                           fix="check the path (relative paths start from the current folder)")
    resolved = path.resolve()
    # One module per file, whatever the spelling of its path: --model and --reference may share a file.
    name = f"_tensorparity_factory_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"factory {spec.text!r}: cannot import this file", path=path,
                           fix="name a Python source file ending in .py")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import(spec: FactorySpec) -> ModuleType:
    if spec.path is not None:
        return _import_file(spec)
    assert spec.module is not None
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        top = spec.module.split(".")[0]
        if exc.name == top:
            raise PackageNotInstalledError(top, spec.text) from None
        if exc.name and (exc.name == spec.module or spec.module.startswith(exc.name + ".")):
            raise FactoryError(f"factory {spec.text!r}: package {top!r} has no module {exc.name!r}",
                               fix="check the spelling of the module path") from None
        raise FactoryError(f"factory {spec.text!r}: importing {spec.module!r} needs {exc.name!r}, which is not "
                           f"installed", fix=f"install {exc.name} (a dependency of {top})") from None


def _attribute(module: ModuleType, spec: FactorySpec) -> Any:
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
                raise FactoryError(f"factory {spec.text!r}: {where!r} has no attribute {part!r}",
                                   fix=f"name one of its functions or classes ({hint})")
            raise FactoryError(f"factory {spec.text!r}: {'.'.join(spec.attribute.split('.')[:depth])!r} has no "
                               f"attribute {part!r}", fix="check the spelling of the attribute path")
        obj = getattr(obj, part)
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, nn.Module):
        return f"<{type(obj).__qualname__} instance>"
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{module}:{name}" if module else str(name)


def _call(factory: Callable[..., Any], label: str) -> Any:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and C extensions: just call it
        signature = None
    if signature is not None:
        required = [p.name for p in signature.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise FactoryError(f"factory {label!r} needs the argument(s) {', '.join(required)}, but factories are "
                               f"called with none",
                               fix="point at a function without required arguments, e.g. "
                                   "def make(): return MyModel(hidden=256)")
    return factory()


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def build_model(factory: Any, *, role: str = "model") -> BuiltModel:
    """Resolve a factory and build the model.

    Args:
        factory: an ``nn.Module`` (used as it is), a zero-argument callable returning one, or a
            string: ``package.module:function``, ``package.module:Class``, or
            ``path/to/file.py:function``. A module-level ``nn.Module`` instance named by a string
            is used as it is.
        role: what the model is for (``model``, ``reference``), for messages.

    Raises:
        PackageNotInstalledError: the factory's top-level package is not installed.
        FactoryError: the string is malformed, the module or attribute does not exist, importing
            or calling raised, or the result is not an ``nn.Module``.

    Example:
        >>> built = build_model("tensorparity.examples:reference_model")
        >>> built.model_class
        'tensorparity.examples.reference.ReferenceModel'
    """
    if isinstance(factory, nn.Module):
        return BuiltModel(factory, _describe(factory), _class_name(factory))
    if isinstance(factory, str):
        spec = parse_factory(factory)
        label = spec.text
        folder = spec.path.expanduser().resolve().parent if spec.path is not None else Path.cwd()
    elif callable(factory):
        spec, label, folder = None, _describe(factory), None
    else:
        raise FactoryError(f"the {role} factory must be an nn.Module, a callable or a string, not "
                           f"{type(factory).__name__}", fix=f"pass {_FORMS}")
    with _on_path(folder, first=spec is not None and spec.path is not None):
        try:
            if spec is not None:
                obj = _attribute(_import(spec), spec)
                if isinstance(obj, nn.Module):
                    return BuiltModel(obj, label, _class_name(obj))
                if not callable(obj):
                    raise FactoryError(f"factory {label!r} names a value of type {type(obj).__name__}, not a function or class",
                                       fix="name a function or class that builds the model")
            else:
                obj = factory
            model = _call(obj, label)
        except (UsageError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's code: any failure becomes one line
            what = "importing or calling" if spec is not None else "calling"
            text = " ".join(str(exc).split())[:300]
            raise FactoryError(f"{what} the {role} factory {label!r} raised {type(exc).__name__}"
                               + (f": {text}" if text else ""),
                               fix="fix the error in the factory's code (run it in Python to see the traceback)"
                               ) from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"the {role} factory {label!r} returned an object of type {type(model).__name__}, not a torch.nn.Module",
                           fix="make the factory return the model itself (an nn.Module), not e.g. a state dict "
                               "or a (model, config) tuple")
    return BuiltModel(model, label, _class_name(model))
