"""Build a model from what a user names on the command line or passes in Python.

A *factory* is a ``nn.Module`` (used as it is), a zero-argument callable that returns one, or a
string ``module:function`` / ``module:Class`` / ``path/to/file.py:function`` (the part after the
colon may be dotted: ``pkg.models:Registry.build``). Resolving a string imports the module and
calls the function: this runs the user's own code on purpose (it is their model, not the
checkpoint's), so it is never done for anything read from a checkpoint.

A checkpoint that carries its own model stands where a factory is expected: a ``.nemo`` file is
restored with NeMo's ``ModelPT.restore_from(path, map_location="cpu")`` (the ``nemo`` extra; note
that NeMo's restore unpickles parts of the archive, so name only files you trust), and a local
Hugging Face model folder (one with ``config.json``) is loaded with the class its config's
``architectures`` names, ``transformers.<Arch>.from_pretrained(folder, local_files_only=True)``
(``AutoModel`` when transformers has no such class); nothing is downloaded and no code from the
folder is run.

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

__all__ = ["BuiltModel", "FactoryError", "FactorySpec", "PackageNotInstalledError", "build_model", "carries_model",
           "parse_factory", "resolve_object"]

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


def _bad(spec: str, why: str, noun: str = "factory") -> FactoryError:
    return FactoryError(f"{noun} {spec!r} {why}",
                        fix=f"write {_FORMS}, e.g. mypkg.models:build_model (or name a .nemo file or a "
                            f"Hugging Face model folder holding config.json)")


def carries_model(text: str) -> bool:
    """Whether ``text`` names a checkpoint that carries its own model: a ``.nemo`` file, or a
    folder with ``config.json`` (a Hugging Face model folder; a trace folder has ``manifest.json``).

    Example:
        >>> carries_model("tensorparity.examples:reference_model")
        False
    """
    path = Path(text.strip()).expanduser()
    if path.suffix.lower() == ".nemo":
        return path.is_file()
    return (path / "config.json").is_file() and not (path / "manifest.json").exists()


def _saved_model_path(text: str) -> Path | None:
    """The path of a checkpoint that carries its own model (a ``.nemo`` file, a folder), else ``None``."""
    path = Path(text.strip()).expanduser()
    if path.suffix.lower() == ".nemo" or path.is_dir():
        return path
    return None


def _restore_nemo(path: Path, text: str) -> nn.Module:
    """``ModelPT.restore_from(path, map_location='cpu')``: NeMo's own restore (it unpickles parts
    of the archive; the user named the file to be restored, on purpose)."""
    if not path.is_file():
        raise FactoryError(f"factory {text!r}: no such .nemo file", path=path,
                           fix="check the path (relative paths start from the current folder)")
    if importlib.util.find_spec("nemo") is None:
        raise PackageNotInstalledError("nemo", text, fix="install NeMo to restore a .nemo file: "
                                       "pip install 'tensorparity[nemo]' 'nemo_toolkit[asr]'")
    try:
        from nemo.core import ModelPT  # type: ignore[import-not-found]
    except ImportError as exc:
        raise FactoryError(f"factory {text!r}: importing NeMo failed ({type(exc).__name__}: {exc})",
                           fix="repair the NeMo installation: pip install 'tensorparity[nemo]' 'nemo_toolkit[asr]'"
                           ) from None
    return ModelPT.restore_from(str(path), map_location="cpu")


def _hf_class(folder: Path, text: str) -> Any:
    """The transformers class a saved folder's ``config.json`` names (``architectures``), else ``AutoModel``."""
    import json

    config = folder / "config.json"
    if not config.is_file():
        raise FactoryError(f"factory {text!r} is a folder without config.json, so it is not a Hugging Face model "
                           f"folder", path=folder,
                           fix="name a folder written by save_pretrained (config.json plus weights), a .nemo file, "
                               f"or {_FORMS}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FactoryError(f"factory {text!r}: config.json is not readable JSON ({exc})", path=config,
                           fix="re-save the model with save_pretrained") from None
    if importlib.util.find_spec("transformers") is None:
        raise PackageNotInstalledError("transformers", text, fix="install transformers to load a Hugging Face "
                                       "model folder: pip install transformers")
    import transformers

    names = data.get("architectures") if isinstance(data, dict) else None
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and name.isidentifier():
            try:
                cls = getattr(transformers, name, None)
            except Exception:  # noqa: BLE001 - transformers' lazy import of a class that cannot load here
                cls = None
            if cls is not None and hasattr(cls, "from_pretrained"):
                return cls
    return transformers.AutoModel


def _load_saved(path: Path, text: str) -> nn.Module:
    """Build the model a ``.nemo`` file or a Hugging Face folder carries."""
    if path.suffix.lower() == ".nemo" and not path.is_dir():
        return _restore_nemo(path, text)
    cls = _hf_class(path, text)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no progress bar on stderr, where errors are one line
    try:
        # local_files_only: never download; trust_remote_code stays off, so no code from the folder runs.
        return cls.from_pretrained(str(path), local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


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


def _build_saved(path: Path, text: str, role: str) -> BuiltModel:
    try:
        model = _load_saved(path, text)
    except (UsageError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - NeMo's and transformers' own loading: any failure is one line
        what = "restoring the .nemo file" if path.suffix.lower() == ".nemo" else "loading the Hugging Face folder"
        detail = " ".join(str(exc).split())[:300]
        raise FactoryError(f"{what} of the {role} {text!r} raised {type(exc).__name__}" + (f": {detail}" if detail else ""),
                           fix="check that it loads in Python (see the traceback there); a folder needs config.json "
                               "and its weights (model.safetensors) from save_pretrained") from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"the {role} {text!r} loaded as a {type(model).__name__}, not a torch.nn.Module",
                           fix="save the model itself (save_pretrained / save_to)")
    return BuiltModel(model, text, _class_name(model))


def build_model(factory: Any, *, role: str = "model") -> BuiltModel:
    """Resolve a factory and build the model.

    Args:
        factory: an ``nn.Module`` (used as it is), a zero-argument callable returning one, or a
            string: ``package.module:function``, ``package.module:Class``, or
            ``path/to/file.py:function``. A module-level ``nn.Module`` instance named by a string
            is used as it is. A string naming a ``.nemo`` file or a Hugging Face model folder
            (``config.json``) builds the model that checkpoint carries (see the module docstring).
        role: what the model is for (``model``, ``reference``), for messages.

    Raises:
        PackageNotInstalledError: the factory's top-level package is not installed (for a
            ``.nemo`` file: NeMo is not).
        FactoryError: the string is malformed, the module or attribute does not exist, importing
            or calling raised, or the result is not an ``nn.Module``.

    Example:
        >>> built = build_model("tensorparity.examples:reference_model")
        >>> built.model_class
        'tensorparity.examples.reference.ReferenceModel'
    """
    if isinstance(factory, nn.Module):
        return BuiltModel(factory, _describe(factory), _class_name(factory))
    if isinstance(factory, str) and (saved := _saved_model_path(factory)) is not None:
        return _build_saved(saved, factory, role)
    if isinstance(factory, str):
        label = factory.strip()
        obj = resolve_object(factory)
        if isinstance(obj, nn.Module):
            return BuiltModel(obj, label, _class_name(obj))
        if not callable(obj):
            raise FactoryError(f"factory {label!r} names a value of type {type(obj).__name__}, not a function or class",
                               fix="name a function or class that builds the model")
    elif callable(factory):
        obj, label = factory, _describe(factory)
    else:
        raise FactoryError(f"the {role} factory must be an nn.Module, a callable or a string, not "
                           f"{type(factory).__name__}", fix=f"pass {_FORMS}")
    spec = parse_factory(factory) if isinstance(factory, str) else None
    folder = None if spec is None else spec.path.expanduser().resolve().parent if spec.path is not None else Path.cwd()
    with _on_path(folder, first=spec is not None and spec.path is not None):  # as while it was imported
        try:
            model = _call(obj, label)
        except (UsageError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's code: any failure becomes one line
            text = " ".join(str(exc).split())[:300]
            raise FactoryError(f"calling the {role} factory {label!r} raised {type(exc).__name__}"
                               + (f": {text}" if text else ""),
                               fix="fix the error in the factory's code (run it in Python to see the traceback)"
                               ) from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"the {role} factory {label!r} returned an object of type {type(model).__name__}, not a torch.nn.Module",
                           fix="make the factory return the model itself (an nn.Module), not e.g. a state dict "
                               "or a (model, config) tuple")
    return BuiltModel(model, label, _class_name(model))
