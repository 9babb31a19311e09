"""The training loop every leg runs (inside a child process): build, load, iterate, step, record.

tensorparity owns the iteration over the data loader so that it always knows the data position
and can hash every batch. Epochs: ``sampler.set_epoch(epoch)`` (when the sampler has it), then
``iter(loader)``; just before that, the RNG states the iterator will draw its shuffle from are
kept in ``progress.epoch_rng``. A resumed plain ``DataLoader`` is fast-forwarded: those states are
put back, a new iterator skips ``progress.batch_in_epoch`` batches, and the RNG states of the
moment are restored. A stateful loader (torchdata's ``StatefulDataLoader``) resumes from its own
``state_dict`` instead.

Every call into the recipe is guarded: what it raises becomes one :class:`RecipeError` line
naming the method and the step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch import nn

from tensorparity.resume._recipe_errors import RecipeError
from tensorparity.resume.fingerprint import StepRecord, hash_batch, state_hashes
from tensorparity.resume.recipe import LoadedRecipe, TrainingObjects, as_objects
from tensorparity.resume.state import data_rng, rng_state, set_data_rng, set_rng_state, stateful_loader

__all__ = ["build", "describe", "guarded", "inside_group", "recording_loads", "seed_everything", "train"]

_FIX = "fix the recipe's {what} (call it in Python to see the traceback)"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): every leg builds from the same RNG states."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def guarded(loaded: LoadedRecipe, what: str, *, step: int | None = None) -> Iterator[None]:
    """Turn anything the recipe's code raises into one RecipeError line."""
    try:
        yield
    except (RecipeError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's code: any failure becomes one line
        at = f" at step {step}" if step is not None else ""
        text = " ".join(str(exc).split())[:300]
        raise RecipeError(f"the recipe's {what} raised {type(exc).__name__}{at}" + (f": {text}" if text else ""),
                          key=loaded.spec.text, fix=_FIX.format(what=what)) from exc


def build(loaded: LoadedRecipe, seed: int) -> TrainingObjects:
    """Seed, call ``build()``, and check what it returned."""
    seed_everything(seed)
    with guarded(loaded, "build()"):
        built = loaded.recipe.build()
    return as_objects(built, where=loaded.spec.text)


def inside_group(loaded: LoadedRecipe, step: int) -> bool:
    """Whether ``step`` ends inside a gradient-accumulation group."""
    return loaded.accumulate > 1 and step % loaded.accumulate != 0


def describe(objs: TrainingObjects) -> dict[str, Any]:
    """What the audit's messages need to know about the objects."""
    loader = objs.dataloader
    try:
        per_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    sampler = getattr(loader, "sampler", None)
    return {
        "dropout": any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in objs.model.modules()),
        "global_shuffle": isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None
        and getattr(loader, "generator", None) is None,
        "stateful_loader": stateful_loader(loader), "steps_per_epoch": per_epoch,
        "loader": type(loader).__name__,
        "optimizer": type(objs.optimizer).__name__ if objs.optimizer is not None else None,
        "scheduler": type(objs.scheduler).__name__ if objs.scheduler is not None else None,
        "scaler": type(objs.scaler).__name__ if objs.scaler is not None else None,
        "extras": {k: type(v).__name__ for k, v in objs.extras.items()},
    }


@contextmanager
def recording_loads(objs: TrainingObjects) -> Iterator[list[dict[str, Any]]]:
    """Record every non-strict ``load_state_dict`` on the model or a module in extras while the
    recipe's ``load`` runs: what it skipped is invisible otherwise. Each call: the keys it
    skipped (``missing``), could not place (``unexpected``) and loaded, which loaded keys are
    trainable parameters and which skipped ones are frozen parameters."""
    owners: dict[int, tuple[str, str]] = {}  # module -> (object it belongs to, its path inside it)
    roots = [("model", objs.model), *((f"extras.{k}", v) for k, v in objs.extras.items() if isinstance(v, nn.Module))]
    for root, module in roots:
        for name, sub in module.named_modules():
            owners.setdefault(id(sub), (root, name))
    calls: list[dict[str, Any]] = []
    original = nn.Module.load_state_dict

    def recording(self: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, state_dict, *args, **kwargs)
        strict = kwargs.get("strict", args[0] if args else True)
        if id(self) in owners and not strict:
            root, path = owners[id(self)]
            prefix = f"{path}." if path else ""
            unexpected = set(result.unexpected_keys)
            params = dict(self.named_parameters())
            loaded = [k for k in state_dict if k not in unexpected]
            # Which side of a trainable/frozen split the checkpoint covers (an adapter-only
            # checkpoint holds the trainable keys and skips the frozen base).
            calls.append({"owner": root, "module": f"{root}.{path}" if path else root,
                          "missing": [prefix + k for k in result.missing_keys],
                          "unexpected": [prefix + k for k in result.unexpected_keys],
                          "loaded": [prefix + k for k in loaded],
                          "trainable": [prefix + k for k in loaded if k in params and params[k].requires_grad],
                          "frozen": [prefix + k for k in result.missing_keys
                                     if k in params and not params[k].requires_grad]})
        return result

    nn.Module.load_state_dict = recording  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        nn.Module.load_state_dict = original  # type: ignore[method-assign]


class _Probe:
    """Sees each optimizer step just before it happens: the gradients and learning rate it uses."""

    def __init__(self, objs: TrainingObjects) -> None:
        self.objs = objs
        self.grad_norm: float | None = None
        self.lr: float | None = None
        optimizer = objs.optimizer
        if callable(getattr(optimizer, "register_step_pre_hook", None)):
            optimizer.register_step_pre_hook(self._hook)

    def reset(self) -> None:
        self.grad_norm, self.lr = None, None

    @property
    def updated(self) -> bool:
        return self.lr is not None

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.grad_norm = grad_norm(self.objs.model)
        groups = getattr(optimizer, "param_groups", None) or [{}]
        lr = groups[0].get("lr")
        self.lr = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else float("nan")


def grad_norm(model: nn.Module) -> float | None:
    """The L2 norm of every gradient together, in float32; ``None`` when there are none."""
    norms = [_full(torch.linalg.vector_norm(p.grad.detach().float())).cpu() for p in model.parameters()
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded gradient's norm (a DTensor, partial on each rank) reduced over the ranks."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _set_epoch(loader: Any, epoch: int) -> None:
    for owner in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)


def _fast_forward(objs: TrainingObjects) -> Iterator[Any]:
    """A plain DataLoader resumed mid-epoch: rebuild the epoch's iterator from the RNG states it
    was first built from, skip what was consumed, then put the RNG states of now back."""
    p, loader = objs.progress, objs.dataloader
    now = data_rng(objs)
    if p.epoch_rng is not None:
        set_data_rng(objs, p.epoch_rng)
    _set_epoch(loader, p.epoch)
    it = iter(loader)
    for _ in range(p.batch_in_epoch):
        if next(it, _END) is _END:
            break
    set_data_rng(objs, now)
    return it


_END = object()


def _batches(loaded: LoadedRecipe, objs: TrainingObjects) -> Iterator[Any]:
    p, loader = objs.progress, objs.dataloader
    resuming = p.batch_in_epoch > 0
    while True:
        fresh = p.batch_in_epoch == 0
        if resuming and not stateful_loader(loader):
            it = _fast_forward(objs)
        elif resuming:
            # A stateful loader continues from its own state; creating its iterator must not
            # draw from the RNGs the checkpoint just restored (the uninterrupted run never did).
            # (Only the global ones: its own generators are part of the state it just loaded.)
            now = rng_state()
            _set_epoch(loader, p.epoch)
            it = iter(loader)
            set_rng_state(now)
        else:
            if fresh:
                p.epoch_rng = data_rng(objs)
            _set_epoch(loader, p.epoch)
            it = iter(loader)
        resuming, got = False, False
        for batch in it:
            got = True
            p.batch_in_epoch += 1
            yield batch
        if fresh and not got:
            raise RecipeError(f"the data loader yielded no batch in epoch {p.epoch} (after {p.step} steps)",
                              key=loaded.spec.text, fix="make the data loader re-iterable (a DataLoader, not a "
                                                         "generator) and non-empty, or ask for fewer steps")
        p.epoch += 1
        p.batch_in_epoch = 0


def _loss(value: Any, loaded: LoadedRecipe, step: int) -> tuple[float | None, str]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise RecipeError(f"the recipe's step() returned a tensor of shape {list(value.shape)} at step {step}, "
                              f"not a scalar loss", key=loaded.spec.text, fix="return the scalar loss")
        return float(value.detach().item()), str(value.dtype).removeprefix("torch.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "float64"
    if value is None:
        return None, "float64"
    raise RecipeError(f"the recipe's step() returned a {type(value).__name__} at step {step}, not the loss",
                      key=loaded.spec.text, fix="return the loss tensor (or a float)")


def train(loaded: LoadedRecipe, objs: TrainingObjects, *, start: int, stop: int,
          after_step: Callable[[int], None] | None = None,
          on_batch: Callable[[int, Any], None] | None = None) -> list[StepRecord]:
    """Run steps ``start + 1`` .. ``stop`` and return their fingerprints (``on_batch(step, batch)``
    sees each batch before its step).

    Raises:
        RecipeError: the recipe's step/update or the data loader raised, or the loader ran dry.
    """
    records: list[StepRecord] = []
    probe = _Probe(objs)
    batches = _batches(loaded, objs)
    p = objs.progress
    for step in range(start + 1, stop + 1):
        try:
            batch = next(batches)
        except RecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's dataset: any failure becomes one line
            raise RecipeError(f"the data loader raised {type(exc).__name__} fetching the batch of step {step}: "
                              f"{' '.join(str(exc).split())[:300]}", key=loaded.spec.text,
                              fix="fix the dataset (iterate the loader in Python to see the traceback)") from exc
        p.step = step
        epoch, index, batch_hash = p.epoch, p.batch_in_epoch - 1, hash_batch(batch)
        if on_batch is not None:
            on_batch(step, batch)
        probe.reset()
        with guarded(loaded, "step()", step=step):
            value = loaded.recipe.step(objs, batch)
        loss, dtype = _loss(value, loaded, step)
        if loaded.accumulate > 1 and step % loaded.accumulate == 0:
            with guarded(loaded, "update()", step=step):
                loaded.recipe.update(objs)
        norm = probe.grad_norm if probe.updated else grad_norm(objs.model)
        records.append(StepRecord(step, epoch, index, batch_hash, loss, dtype, norm, probe.lr, probe.updated,
                                  state_hashes(objs.model.state_dict())))
        if after_step is not None:
            after_step(step)
    return records


def wrote_something(path: Path) -> bool:
    """Whether a save left anything at ``path``."""
    if path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())
