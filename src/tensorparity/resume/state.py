"""Everything stateful in a training run, captured as plain data and restored: the default
save/load, the snapshots the audit compares, and the parts a confirmation run swaps in.

A state is a nested dict of tensors and plain values (no numpy arrays, no custom classes), so a
file of it loads with ``torch.load(weights_only=True)`` and opens with :func:`tensorparity.open`:

================  ===============================================================
``model``         ``model.state_dict()`` (parameters and persistent buffers)
``buffers``       the model's buffers registered with ``persistent=False`` (which ``state_dict()``
                  leaves out), by module path and name; only when the model has any
``mode``          ``{"training": model.training}``
``optimizer``     ``optimizer.state_dict()`` (when there is one); likewise ``scheduler``, ``scaler``
``extras``        each extra's ``state_dict()`` (RNG objects: their state)
``grads``         accumulated gradients, only inside a gradient-accumulation group
``rng``           ``python``, ``numpy``, ``torch`` and (once CUDA is in use) ``cuda`` RNG states
``data``          ``progress`` (epoch, batch in epoch, step, the epoch's shuffle RNG),
                  the data loader's generators, and a stateful loader's ``state_dict()``
================  ===============================================================

Each top-level key (``extras.<name>`` and ``rng.<kind>`` one level down) is a *component*: the
unit the audit names and a confirmation run takes from the uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorparity.resume._recipe_errors import RecipeError
from tensorparity.resume.recipe import TrainingObjects

__all__ = ["FORMAT", "capture", "component_of", "components", "data_rng", "load", "non_persistent_buffers", "restore",
           "rng_state", "save", "set_data_rng", "set_rng_state", "stateful_loader"]

FORMAT = "tensorparity.resume.state/1"
_RNG_KINDS = ("python", "numpy", "torch", "cuda")


# ---------------------------------------------------------------------------------------------
# RNG states as plain data


def _python_state(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_tuple(data: Mapping[str, Any]) -> tuple[Any, ...]:
    return (int(data["version"]), tuple(int(x) for x in data["state"].tolist()), data["gauss"])


def _numpy_state(state: tuple[Any, ...]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(data: Mapping[str, Any]) -> tuple[Any, ...]:
    return (data["kind"], data["keys"].numpy().astype(np.uint32), int(data["pos"]), int(data["has_gauss"]),
            float(data["cached_gaussian"]))


def rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy, torch and (when CUDA is in use) every CUDA device,
    as data that ``torch.load(weights_only=True)`` reads back.

    Use it in your own ``save`` and :func:`set_rng_state` in your ``load``.

    Example:
        >>> state = rng_state()
        >>> a = torch.rand(1); set_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    state: dict[str, Any] = {"python": _python_state(random.getstate()),
                             "numpy": _numpy_state(np.random.get_state(legacy=True)),  # type: ignore[arg-type]
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # never initialises CUDA itself
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (kinds it lacks are left alone).

    Example:
        >>> set_rng_state(rng_state())
    """
    if "python" in state:
        random.setstate(_python_tuple(state["python"]))
    if "numpy" in state:
        np.random.set_state(_numpy_tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """The torch generators a DataLoader draws its shuffle and worker seeds from, when it has its own."""
    found: dict[str, torch.Generator] = {}
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None)),
                        ("batch_sampler", getattr(getattr(loader, "batch_sampler", None), "sampler", None))):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
            found[name] = gen
    return found


def data_rng(objs: TrainingObjects) -> dict[str, Any]:
    """Every RNG state the data loader's next iterator could draw from: the global ones and the
    loader's own generators.

    Example:
        >>> objs = TrainingObjects(model=torch.nn.Linear(1, 1), dataloader=[])
        >>> sorted(data_rng(objs))
        ['generators', 'global']
    """
    return {"global": rng_state(),
            "generators": {k: g.get_state() for k, g in _loader_generators(objs.dataloader).items()}}


def set_data_rng(objs: TrainingObjects, state: Mapping[str, Any]) -> None:
    """Restore what :func:`data_rng` captured."""
    set_rng_state(state["global"])
    gens = _loader_generators(objs.dataloader)
    for name, value in state.get("generators", {}).items():
        if name in gens:
            gens[name].set_state(value)


def stateful_loader(loader: Any) -> bool:
    """Whether the data loader saves its own position (torchdata's ``StatefulDataLoader``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


# ---------------------------------------------------------------------------------------------
# Extras: state_dict objects and RNG objects


def _extra_state(name: str, obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return {"torch_generator": obj.get_state()}
    if isinstance(obj, np.random.RandomState):
        return {"numpy_random_state": _numpy_state(obj.get_state(legacy=True))}  # type: ignore[arg-type]
    if isinstance(obj, np.random.Generator):
        return {"numpy_generator": obj.bit_generator.state}
    if isinstance(obj, random.Random):
        return {"python_random": _python_state(obj.getstate())}
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return obj.state_dict()
    raise RecipeError(f"extras[{name!r}] is a {type(obj).__name__}, which has no state_dict()/load_state_dict() "
                      f"and is not an RNG", fix="put only stateful objects in extras (an EMA, an optimizer, "
                                                "a torch/numpy/python RNG)")


def _set_extra_state(name: str, obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state["torch_generator"])
    elif isinstance(obj, np.random.RandomState):
        obj.set_state(_numpy_tuple(state["numpy_random_state"]))
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state["numpy_generator"]
    elif isinstance(obj, random.Random):
        obj.setstate(_python_tuple(state["python_random"]))
    else:
        obj.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Buffers state_dict() leaves out


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers registered with ``persistent=False``, by ``module.path.name``: state a
    ``state_dict()`` checkpoint never holds.

    Example:
        >>> m = torch.nn.Module(); m.register_buffer("cache", torch.zeros(2), persistent=False)
        >>> list(non_persistent_buffers(torch.nn.Sequential(m)))
        ['0.cache']
    """
    found: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if buf is not None:
                found[f"{path}.{name}" if path else name] = buf.detach()
    return found


def _restore_buffers(model: torch.nn.Module, saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        path, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or name not in module._non_persistent_buffers_set:
            raise RecipeError(f"the saved state has a non-persistent buffer {key!r} the model does not have",
                              fix="save with the same recipe that loads")
        current = module._buffers.get(name)
        if current is not None and current.shape == value.shape and current.dtype == value.dtype:
            with torch.no_grad():
                current.copy_(value)
        else:
            module._buffers[name] = value.to(current.device) if current is not None else value.clone()


# ---------------------------------------------------------------------------------------------
# Capture and restore


def capture(objs: TrainingObjects, *, inside_group: bool = False) -> dict[str, Any]:
    """Everything stateful about a run now, as plain data (see the module's table).

    Args:
        objs: the training objects.
        inside_group: the run stands inside a gradient-accumulation group, so the accumulated
            gradients are state too (outside one they are leftovers the next step zeroes).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> state = capture(TrainingObjects(model=model, dataloader=[],
        ...                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
        >>> sorted(state)
        ['data', 'extras', 'format', 'mode', 'model', 'optimizer', 'rng']
    """
    state: dict[str, Any] = {"format": FORMAT, "model": objs.model.state_dict()}
    buffers = non_persistent_buffers(objs.model)
    if buffers:
        state["buffers"] = buffers
    state["mode"] = {"training": bool(objs.model.training)}
    for name in ("optimizer", "scheduler", "scaler"):
        obj = getattr(objs, name)
        if obj is not None:
            state[name] = obj.state_dict()
    state["extras"] = {name: _extra_state(name, obj) for name, obj in objs.extras.items()}
    if inside_group:
        state["grads"] = {n: p.grad.detach().clone() for n, p in objs.model.named_parameters() if p.grad is not None}
    state["rng"] = rng_state()
    data: dict[str, Any] = {"progress": objs.progress.state_dict(),
                            "generators": {k: g.get_state() for k, g in _loader_generators(objs.dataloader).items()}}
    if stateful_loader(objs.dataloader):
        # StatefulDataLoader.state_dict() creates its iterator when there is none yet, drawing
        # from torch's global RNG: capturing must not change what it captures.
        now = rng_state()
        data["loader"] = objs.dataloader.state_dict()  # type: ignore[attr-defined]
        set_rng_state(now)
    state["data"] = data
    return state


def components(state: Mapping[str, Any]) -> list[str]:
    """The components a state holds, in restore order.

    Example:
        >>> components({"model": {}, "rng": {"torch": None, "numpy": None}, "extras": {"ema": {}}})
        ['model', 'extras.ema', 'rng.numpy', 'rng.torch']
    """
    order = ("model", "buffers", "mode", "optimizer", "scheduler", "scaler", "extras", "grads", "data", "rng")
    out: list[str] = []
    for top in order:
        if top not in state:
            continue
        if top in ("extras", "rng"):
            kinds = _RNG_KINDS if top == "rng" else tuple(state[top])
            out += [f"{top}.{k}" for k in kinds if k in state[top]]
        else:
            out.append(top)
    return out


def component_of(key: str) -> str:
    """The component a flat state key belongs to.

    Example:
        >>> component_of("optimizer.state.0.exp_avg"), component_of("extras.ema.n_averaged")
        ('optimizer', 'extras.ema')
    """
    top, _, rest = key.partition(".")
    if top in ("extras", "rng") and rest:
        return f"{top}.{rest.partition('.')[0]}"
    return top


def restore(objs: TrainingObjects, state: Mapping[str, Any], *, only: Collection[str] | None = None) -> None:
    """Put a captured state back into freshly built training objects.

    Args:
        objs: the training objects.
        state: what :func:`capture` returned (or a file of it, read back).
        only: restore just these components (``"optimizer"``, ``"rng.torch"``, ``"extras.ema"``,
            ``"buffers"``); all of them by default.

    Raises:
        RecipeError: the state lacks a component the objects have (or ``only`` names).

    Example:
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> restore(TrainingObjects(model=b, dataloader=[]), capture(TrainingObjects(model=a, dataloader=[])))
        >>> torch.equal(a.weight, b.weight)
        True
    """
    wanted = set(components(state)) if only is None else set(only)
    present = {"model", "buffers", "mode", "data", *components(state)}
    for name in ("optimizer", "scheduler", "scaler"):
        if getattr(objs, name) is not None and name not in state and (only is None or name in wanted):
            raise RecipeError(f"the saved state has no {name!r} but the recipe builds a {name}",
                              fix="save with the same recipe that loads")
    missing = sorted(wanted - present)
    if missing:
        raise RecipeError(f"the saved state has no {', '.join(map(repr, missing))}",
                          fix="save with the same recipe that loads")
    if "model" in wanted:
        objs.model.load_state_dict(state["model"])
    if "buffers" in wanted and "buffers" in state:
        _restore_buffers(objs.model, state["buffers"])
    if "mode" in wanted:
        objs.model.train(bool(state["mode"]["training"]))
    for name in ("optimizer", "scheduler", "scaler"):
        obj = getattr(objs, name)
        if name in wanted and obj is not None:
            obj.load_state_dict(state[name])
    for name, obj in objs.extras.items():
        if f"extras.{name}" in wanted:
            _set_extra_state(name, obj, state["extras"][name])
    if "grads" in wanted:
        grads = state["grads"]
        for n, p in objs.model.named_parameters():
            p.grad = grads[n].to(device=p.device, dtype=p.dtype).clone() if n in grads else None
    if "data" in wanted:
        data = state["data"]
        objs.progress.load_state_dict(data["progress"])
        gens = _loader_generators(objs.dataloader)
        for name, value in data.get("generators", {}).items():
            if name in gens:
                gens[name].set_state(value)
        if "loader" in data and stateful_loader(objs.dataloader):
            objs.dataloader.load_state_dict(data["loader"])  # type: ignore[attr-defined]
    rng = {kind: state["rng"][kind] for kind in _RNG_KINDS if f"rng.{kind}" in wanted}
    set_rng_state(rng)


def save(objs: TrainingObjects, path: str | Path, *, inside_group: bool = False) -> None:
    """tensorparity's default save: :func:`capture` written with ``torch.save``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> save(TrainingObjects(model=torch.nn.Linear(1, 1), dataloader=[]), p); p.exists()
        True
    """
    torch.save(capture(objs, inside_group=inside_group), path)


def load(objs: TrainingObjects, path: str | Path) -> None:
    """tensorparity's default load: read a :func:`save` file with ``torch.load(weights_only=True)``
    (nothing in it is executed) and :func:`restore` everything.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        >>> save(TrainingObjects(model=a, dataloader=[]), p); load(TrainingObjects(model=b, dataloader=[]), p)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RecipeError("not a state saved by tensorparity's default save", path=path,
                          fix="load it with the recipe's own load(), or save it with tensorparity.resume.state.save")
    restore(objs, state)
