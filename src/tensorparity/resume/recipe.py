"""The recipe protocol: what a user writes so that tensorparity can train, save, resume and compare.

A recipe is a small class with two required methods, ``build`` (make the training objects) and
``step`` (one training step on one batch), and optional ones: ``save``/``load`` (the user's own
checkpoint code, the thing under test), ``update`` and ``accumulate`` (gradient accumulation).
tensorparity owns the iteration over the data loader (epochs, ``sampler.set_epoch``) so that it
can hash every batch and always knows the data position; the position lives in
``objs.progress``, which a user's ``save`` must save like any other state.

Recipes are named like model factories (:func:`tensorparity._factory.parse_factory`):
``package.module:Recipe`` or ``path/to/file.py:Recipe``; the name may point at a class (called
without arguments), a module-level instance, or a function returning a recipe. The resumed leg
runs in a fresh process that receives only that name (and the checkpoint), so a recipe object
passed in Python is turned back into such a name by :func:`spec_of`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from tensorparity._resolve import FactoryError, _on_path, parse_factory, resolve_object
from tensorparity.errors import TensorParityError
from tensorparity.resume._recipe_errors import RecipeError

__all__ = ["LoadedRecipe", "Progress", "Recipe", "RecipeSpec", "TrainingObjects", "as_objects", "load_recipe",
           "spec_of"]

_OBJECT_KEYS = ("model", "dataloader", "optimizer", "scheduler", "scaler", "extras")
_FIX_FORM = "name it 'package.module:Recipe' or 'path/to/recipe.py:Recipe'"


@runtime_checkable
class Recipe(Protocol):
    """What tensorparity needs to train a run, stop it, and resume it in a fresh process.

    Required:

    * ``build(self)`` returns the training objects: a :class:`TrainingObjects`, or a dict with
      the keys ``model`` and ``dataloader`` and optionally ``optimizer``, ``scheduler``,
      ``scaler`` and ``extras`` (a dict of any other stateful objects: an EMA, a second
      optimizer, a ``torch.Generator``, a numpy ``Generator`` or a ``random.Random``). tensorparity
      seeds python, numpy and torch before every call, so the objects come out the same in every
      process.
    * ``step(self, objs, batch)`` runs one training step on one batch and returns the loss:
      forward, backward, ``optimizer.step()``, ``scheduler.step()``, EMA update, ``zero_grad``.

    Optional:

    * ``save(self, objs, path)`` / ``load(self, objs, path)``: the checkpoint code under test.
      ``path`` does not exist yet; write a file or a folder there. ``load`` is called on freshly
      built objects in a fresh process. Without them tensorparity's own save/load is used, which
      captures everything stateful (:mod:`tensorparity.resume.state`). Either both or neither.
    * ``accumulate = k`` with ``update(self, objs)``: gradient accumulation. ``step`` then only
      does forward and backward for one micro-batch, and tensorparity calls ``update`` (optimizer
      step, scheduler step, ``zero_grad``) after every k-th one. Steps are counted in
      micro-batches, so a resume point that is not a multiple of k lands inside a group: the
      checkpoint must then carry the accumulated gradients.

    Example:
        >>> import torch
        >>> class Tiny:
        ...     def build(self):
        ...         model = torch.nn.Linear(2, 1)
        ...         data = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)
        ...         return {"model": model, "dataloader": data,
        ...                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
        ...     def step(self, objs, batch):
        ...         objs.optimizer.zero_grad()
        ...         loss = objs.model(batch).pow(2).mean()
        ...         loss.backward()
        ...         objs.optimizer.step()
        ...         return loss
        >>> isinstance(Tiny(), Recipe)
        True
        >>> objs = as_objects(Tiny().build(), where="Tiny")
        >>> type(objs.optimizer).__name__, objs.progress.step
        ('SGD', 0)
    """

    def build(self) -> TrainingObjects | Mapping[str, Any]: ...

    def step(self, objs: TrainingObjects, batch: Any) -> Any: ...


@dataclass
class Progress:
    """Where the training stands in the data: kept by tensorparity's loop, saved like any state.

    Attributes:
        epoch: the current epoch (0-based); passed to ``sampler.set_epoch``.
        batch_in_epoch: batches of this epoch consumed so far.
        step: steps (micro-batches) done in all.
        epoch_rng: the RNG states the current epoch's iterator was created from (its shuffle), so
            that a plain ``DataLoader`` can be fast-forwarded to ``batch_in_epoch`` exactly.

    Example:
        >>> p = Progress(epoch=1, batch_in_epoch=2, step=8)
        >>> q = Progress(); q.load_state_dict(p.state_dict()); q.step
        8
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    epoch_rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "epoch_rng": self.epoch_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.step = int(state["step"])
        self.epoch_rng = state.get("epoch_rng")


@dataclass
class TrainingObjects:
    """The objects one run trains with. ``build`` may return this or a dict with the same keys.

    Not frozen on purpose: these are live, mutable training objects, not a record. ``objs["model"]``
    works as well as ``objs.model``.

    Attributes:
        model: the ``nn.Module`` trained.
        dataloader: what tensorparity iterates: a ``DataLoader``, a torchdata
            ``StatefulDataLoader`` (its own ``state_dict`` is then the data position), or any
            re-iterable of batches.
        optimizer, scheduler, scaler: the usual; any may be ``None``.
        extras: other stateful objects by name (``{"ema": AveragedModel(...)}``): anything with
            ``state_dict``/``load_state_dict``, or an RNG (``torch.Generator``,
            ``numpy.random.Generator``/``RandomState``, ``random.Random``).
        progress: the data position, filled in by tensorparity.
    """

    model: nn.Module
    dataloader: Iterable[Any]
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)

    def __getitem__(self, name: str) -> Any:
        if name in _OBJECT_KEYS or name == "progress":
            return getattr(self, name)
        if name in self.extras:
            return self.extras[name]
        raise KeyError(name)


def as_objects(built: Any, *, where: str) -> TrainingObjects:
    """Check what ``build()`` returned and make it a :class:`TrainingObjects`.

    Raises:
        RecipeError: not a dict or TrainingObjects, an unknown key, no model or data loader.

    Example:
        >>> import torch
        >>> as_objects({"model": torch.nn.Linear(1, 1), "dataloader": [1, 2]}, where="r").extras
        {}
    """
    if isinstance(built, TrainingObjects):
        objs = built
    elif isinstance(built, Mapping):
        unknown = [str(k) for k in built if k not in _OBJECT_KEYS]
        if unknown:
            raise RecipeError(f"build() returned the unknown key(s) {', '.join(map(repr, unknown))}", key=where,
                              fix=f"use the keys {', '.join(_OBJECT_KEYS)}; put other stateful objects in "
                                  f"'extras': {{'extras': {{'{unknown[0]}': ...}}}}")
        if "model" not in built or "dataloader" not in built:
            missing = [k for k in ("model", "dataloader") if k not in built]
            raise RecipeError(f"build() returned no {' and no '.join(map(repr, missing))}", key=where,
                              fix="return at least {'model': model, 'dataloader': loader}")
        objs = TrainingObjects(**{k: built[k] for k in _OBJECT_KEYS if k in built and built[k] is not None})
    else:
        raise RecipeError(f"build() returned {type(built).__name__}, not a dict or TrainingObjects", key=where,
                          fix="return {'model': ..., 'dataloader': ..., 'optimizer': ..., ...}")
    if not isinstance(objs.model, nn.Module):
        raise RecipeError(f"build()'s model is a {type(objs.model).__name__}, not a torch.nn.Module", key=where,
                          fix="return the nn.Module itself under 'model'")
    if not isinstance(objs.dataloader, Iterable):
        raise RecipeError(f"build()'s dataloader is a {type(objs.dataloader).__name__}, which cannot be iterated",
                          key=where, fix="return a torch DataLoader (or any re-iterable of batches)")
    if not isinstance(objs.extras, dict) or not all(isinstance(k, str) for k in objs.extras):
        raise RecipeError("build()'s extras must be a dict from names (str) to stateful objects", key=where,
                          fix="return 'extras': {'ema': ema}")
    return objs


@dataclass(frozen=True)
class RecipeSpec:
    """How a fresh process finds the recipe: all a resumed leg is given besides the checkpoint.

    Attributes:
        text: ``package.module:Name`` or ``/abs/path/file.py:Name``.
        sys_path: folders to append to ``sys.path`` before importing (where the parent found it).
        kwargs: keyword arguments to call ``Name`` with (a dataclass recipe's fields), or ``None``.
    """

    text: str
    sys_path: tuple[str, ...] = ()
    kwargs: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "sys_path": list(self.sys_path), "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecipeSpec:
        return cls(str(data["text"]), tuple(data.get("sys_path") or ()), data.get("kwargs"))


@dataclass(frozen=True)
class LoadedRecipe:
    """A recipe resolved and checked.

    Attributes:
        recipe: the recipe object.
        spec: how a fresh process finds it again.
        accumulate: micro-batches per optimizer step (1: none).
        own_checkpoint: whether the recipe brings its own ``save``/``load``.
    """

    recipe: Any
    spec: RecipeSpec
    accumulate: int
    own_checkpoint: bool


def _module_location(module: Any, qualname: str) -> RecipeSpec:
    name = module.__name__
    file = getattr(module, "__file__", None)
    from_file = name == "__main__" or name.startswith("_tensorparity_factory_") or getattr(module, "__spec__", None) is None
    if from_file:
        if not file:
            raise RecipeError(f"recipe {qualname!r} lives in {name!r}, which has no file a fresh process could import",
                              fix=f"define the recipe in a .py file and {_FIX_FORM}")
        return RecipeSpec(f"{Path(file).resolve()}:{qualname}")
    top = sys.modules.get(name.split(".")[0])
    top_file = getattr(top, "__file__", None)
    folder: Path | None = None
    if top_file:
        folder = Path(top_file).resolve().parent
        if Path(top_file).name == "__init__.py":
            folder = folder.parent
    return RecipeSpec(f"{name}:{qualname}", (str(folder),) if folder else ())


def defining_module(what: str, qualname: str, module_name: str, *, error: type[TensorParityError], fix_local: str,
                    fix_import: str) -> Any:
    """The module a fresh process imports ``qualname`` from: refused (``error``) for what is
    defined inside a function, or lives in a module that is not imported."""
    if "<locals>" in qualname:
        raise error(f"{what} {qualname!r} is defined inside a function, so a fresh process cannot import it",
                    fix=fix_local)
    module = sys.modules.get(module_name)
    if module is None:
        raise error(f"{what} {qualname!r}: module {module_name!r} is not imported", fix=fix_import)
    return module


def spec_of(recipe: Any) -> RecipeSpec:
    """The name under which a fresh process finds ``recipe`` again.

    ``recipe`` may be a string (kept as it is, a file made absolute), a class, a module-level
    instance, or an instance of a dataclass whose fields are plain JSON values (rebuilt from
    them).

    Raises:
        RecipeError: the recipe is defined inside a function, or is an instance that cannot be
            rebuilt from its name.

    Example:
        >>> spec_of("tensorparity.examples.resume_recipes:TinyRecipe").text
        'tensorparity.examples.resume_recipes:TinyRecipe'
    """
    if isinstance(recipe, str):
        parsed = parse_factory(recipe)
        if parsed.path is not None:
            return RecipeSpec(f"{parsed.path.expanduser().resolve()}:{parsed.attribute}")
        return RecipeSpec(parsed.text.strip(), (str(Path.cwd()),))
    cls = recipe if isinstance(recipe, type) else type(recipe)
    module = defining_module("recipe class", cls.__qualname__, cls.__module__, error=RecipeError,
                             fix_local="define the recipe class at module level", fix_import=_FIX_FORM)
    if isinstance(recipe, type):
        return _module_location(module, cls.__qualname__)
    for name, value in vars(module).items():
        if value is recipe:
            return _module_location(module, name)
    if dataclasses.is_dataclass(recipe):
        kwargs = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.init}
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError):
            pass
        else:
            return dataclasses.replace(_module_location(module, cls.__qualname__), kwargs=kwargs)
    raise RecipeError(f"a {cls.__qualname__} instance cannot be re-created in a fresh process from its name",
                      fix="pass the class, a module-level instance, a dataclass instance with plain fields, "
                          f"or a string: {_FIX_FORM}")


def _instantiate(obj: Any, spec: RecipeSpec) -> Any:
    if spec.kwargs is not None:
        return obj(**spec.kwargs)
    if isinstance(obj, type):
        return obj()
    if callable(obj) and not hasattr(obj, "build"):
        return obj()  # a function that returns a recipe
    return obj


def load_recipe(recipe: Any) -> LoadedRecipe:
    """Resolve a recipe (a name, class or instance) and check that it has what is needed.

    Importing a named recipe runs the user's own module, as a model factory does.

    Raises:
        RecipeError: the name cannot be imported or resolved, constructing it raised, or it lacks
            ``build``/``step``, has ``save`` without ``load``, or a bad ``accumulate``.

    Example:
        >>> loaded = load_recipe("tensorparity.examples.resume_recipes:TinyRecipe")
        >>> loaded.accumulate, loaded.own_checkpoint
        (1, True)
    """
    spec = spec_of(recipe)
    if isinstance(recipe, str) or spec.kwargs is not None:
        obj = resolve(spec)
    else:
        obj = recipe() if isinstance(recipe, type) else recipe
    return check(obj, spec)


def resolve(spec: RecipeSpec, *, keep_path: bool = False) -> Any:
    """Import ``spec`` and make the recipe object (what a fresh process does).

    ``keep_path``: leave ``spec.sys_path`` on ``sys.path`` afterwards (a fresh process, whose
    recipe may import lazily); otherwise it is there only while importing.
    """
    where = spec.text
    added = [folder for folder in spec.sys_path if folder not in sys.path]
    sys.path.extend(added)
    try:
        return _resolve(spec, where)
    finally:
        if not keep_path:
            for folder in added:
                if folder in sys.path:
                    sys.path.remove(folder)


def _resolve(spec: RecipeSpec, where: str) -> Any:
    try:
        parsed = parse_factory(where, noun="recipe")
    except FactoryError as exc:
        raise RecipeError(exc.message, fix=_FIX_FORM) from None
    found = resolve_object(where, noun="recipe", error=RecipeError)
    folder = parsed.path.expanduser().resolve().parent if parsed.path is not None else Path.cwd()
    with _on_path(folder, first=parsed.path is not None):
        try:
            return _instantiate(found, spec)
        except (RecipeError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the user's code: any failure becomes one line
            raise RecipeError(f"creating the recipe raised {type(exc).__name__}: {_text(exc)}",
                              key=where, fix="fix the error in the recipe module (import it in Python to see "
                                             "the traceback)") from exc


def check(obj: Any, spec: RecipeSpec) -> LoadedRecipe:
    """Check a recipe object's methods and options."""
    where = spec.text
    problems = [f"it has no {name}() method" for name in ("build", "step") if not callable(getattr(obj, name, None))]
    has_save, has_load = callable(getattr(obj, "save", None)), callable(getattr(obj, "load", None))
    if has_save != has_load:
        problems.append(f"it defines {'save' if has_save else 'load'}() without "
                        f"{'load' if has_save else 'save'}()")
    accumulate = getattr(obj, "accumulate", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        problems.append(f"accumulate must be a positive integer, not {accumulate!r}")
        accumulate = 1
    elif accumulate > 1 and not callable(getattr(obj, "update", None)):
        problems.append(f"accumulate = {accumulate} needs an update(objs) method (optimizer step, scheduler "
                        f"step, zero_grad) called after every {accumulate} micro-batches")
    if problems:
        raise RecipeError(f"{type(obj).__name__} is not a usable recipe: {'; '.join(problems)}", key=where,
                          fix="see tensorparity.resume.Recipe: build() and step() are required, save()/load() "
                              "come as a pair")
    return LoadedRecipe(obj, spec, accumulate, has_save)


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
