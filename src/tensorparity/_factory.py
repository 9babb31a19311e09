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

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tensorparity._resolve import (
    _FORMS,
    FactoryError,
    PackageNotInstalledError,
    _on_path,
    parse_factory,
    resolve_object,
)
from tensorparity.errors import UsageError

__all__ = ["BuiltModel", "build_model", "carries_model"]


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
