"""The legs of a Lightning resume check, inside the fresh processes: ``runner`` of each job.

A leg builds the LightningModule and the data from their factories (after seeding python, numpy
and torch), and runs a real ``lightning.Trainer(max_steps=stop).fit(...)`` — resumed legs with
``ckpt_path=`` — with one callback that records every step's fingerprint (batch hash, loss,
gradient norm and learning rate at the optimizer step, hashes of the module's state) and writes
the full state (:func:`tensorparity.resume.state.capture`, plus the data position) at the steps
asked for. A save leg calls ``trainer.save_checkpoint`` from ``on_train_batch_end`` of its last
step, as ``ModelCheckpoint(every_n_train_steps=...)`` does (or after ``fit`` returns).

The states compared are taken *just before a step trains*: the uninterrupted run's "state at
step K" when step K+1 starts, the resumed run's "state right after the load" when its first step
starts. By then Lightning has restored model, optimizers, schedulers and loop counters, adjusted
its counters, started the pass over the data (a new iterator, which may draw from the RNGs) and
fetched the batch — the same moments in both runs. The training ``DataLoader``'s iterators are
watched by wrapping ``DataLoader.__iter__`` (and its subclasses') in this process only: that gives
the data position (the batch's index in the pass) and the RNG states each pass was shuffled from.
A stateful loader (torchdata's ``StatefulDataLoader``) is compared by its own state as the
checkpoint holds it: the uninterrupted run's at step K, the resumed run's as restored.

The data section of a state says where the next batch comes from: Lightning's epoch and
``batch_idx``, the index in the pass, and — a randomly shuffled plain loader — the RNG states
the pass was shuffled from. At the last step of a leg there is no next batch: a finished pass
counts as the start of the next epoch.

A confirmation run takes components from the uninterrupted run at the same moments: ``data``
before the first pass begins (a stateful loader gets its state; a plain one is shuffled from
the same RNG states and skips to the same position), everything else just before the first
resumed step. Lightning's own loop counters cannot be swapped in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.utils.data
from lightning.pytorch.utilities import CombinedLoader

from tensorparity._resolve import resolve_object
from tensorparity.errors import TensorParityError
from tensorparity.resume import state
from tensorparity.resume._loop import describe, grad_norm, recording_loads, seed_everything, wrote_something
from tensorparity.resume._recipe_errors import RecipeError
from tensorparity.resume.fingerprint import StepRecord, hash_batch, state_hashes
from tensorparity.resume.recipe import RecipeSpec, TrainingObjects, resolve

__all__ = ["TRAINER_DEFAULTS", "make", "run_legs"]

# Quiet, CPU, reproducible; the user's trainer options win over these.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
    "enable_checkpointing": False, "enable_model_summary": False, "deterministic": True,
    "num_sanity_val_steps": 0,
}


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def make(text: str, sys_path: list[str] | tuple[str, ...], role: str) -> Any:
    """Import a factory by name and call it (the leg's own model and data)."""
    for folder in sys_path:
        if folder not in sys.path:
            sys.path.append(folder)
    factory = resolve_object(text, noun=f"{role} factory", error=RecipeError)
    try:
        return factory() if callable(factory) else factory
    except Exception as exc:  # noqa: BLE001
        raise RecipeError(f"the {role} factory raised {type(exc).__name__}: {_text(exc)}", key=text,
                          fix=f"fix the {role} factory (call it in Python to see the traceback)") from exc


def _loaders(iterables: Any) -> list[Any]:
    if isinstance(iterables, CombinedLoader):
        return list(iterables.flattened)
    if isinstance(iterables, dict):
        return list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        return list(iterables)
    return [iterables] if iterables is not None else []


def _loss(outputs: Any) -> tuple[float | None, str]:
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().item()), str(value.dtype).removeprefix("torch.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "float64"
    return None, "float64"


class _Tracker(pl.Callback):
    """Records a leg: fingerprints, state snapshots, the data position; saves; swaps in the
    uninterrupted run's components for a confirmation run."""

    def __init__(self, leg: dict[str, Any], work: Path, *, key: str, save_in_loop: bool) -> None:
        self.leg, self.work, self.key = leg, work, key
        self.name, self.stop = str(leg["name"]), int(leg["stop"])
        self.wanted = {int(s) for s in leg.get("snapshots", ())}
        self.save_at = self.stop if leg.get("save") and save_in_loop else None
        self.resumed = bool(leg.get("load"))
        self.trainer: pl.Trainer | None = None
        self.module: pl.LightningModule | None = None
        self.loader: Any = None  # the training DataLoader, once Lightning asked for it
        self.records: list[StepRecord] = []
        self.snapshots: dict[str, str] = {}
        self.waiting: list[tuple[Path, Any]] = []  # states to take when the next batch starts
        self.restored: Any = None  # a stateful loader's state as the checkpoint gave it back
        self.after_load: str | None = None
        self.meta: dict[str, Any] = {}
        self.pass_start = 0  # where the current pass's iterator started (a stateful loader resumes mid-pass)
        self.consumed = 0  # batches the loop took from it since
        self.epoch_rng: dict[str, Any] | None = None
        self.iterators = 0
        self.batch: tuple[int, int, str] | None = None
        self.probe: tuple[float | None, float | None] | None = None
        self.saved = False

    # -- Lightning hooks -----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer, self.module = trainer, pl_module

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        position = self.pass_start + self.consumed
        if self.resumed and not self.records and self.batch is None:  # just before the first resumed step
            self._override_at_start()
            if self.leg.get("after_load"):
                path = self.work / f"{self.name}-after-load.pt"
                self.waiting.append((path, self.restored))
                self.after_load = str(path)
        for path, loader_state in self.waiting:
            torch.save(self._capture(trainer.current_epoch, position, batch_idx, loader_state), path)
        self.waiting.clear()
        self.batch = (trainer.current_epoch, position, hash_batch(batch))
        self.consumed += 1
        self.probe = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.probe is None:  # the first optimizer's step, as tensorparity's own loop records it
            lr = (optimizer.param_groups or [{}])[0].get("lr")
            self.probe = (grad_norm(pl_module), float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.batch is not None
        step = trainer.global_step
        loss, dtype = _loss(outputs)
        norm, lr = self.probe if self.probe is not None else (grad_norm(pl_module), None)
        epoch, index, batch_hash = self.batch
        self.records.append(StepRecord(step, epoch, index, batch_hash, loss, dtype, norm, lr, self.probe is not None,
                                       state_hashes(pl_module.state_dict())))
        if step in self.wanted:
            path = self.work / f"{self.name}-state-{step}.pt"
            self.snapshots[str(step)] = str(path)
            # The loader's state is what a checkpoint saved now holds (its iterator exists: reading it draws nothing).
            loader_state = self.loader.state_dict() if self._stateful() else None
            if step == self.stop:  # no next batch to wait for: a finished pass is the next epoch's start
                position, epoch, index = self.pass_start + self.consumed, trainer.current_epoch, batch_idx + 1
                if position >= trainer.num_training_batches:
                    position, epoch, index = 0, epoch + 1, 0
                torch.save(self._capture(epoch, position, index, loader_state), path)
            else:
                self.waiting.append((path, loader_state))
        if step == self.save_at:
            trainer.save_checkpoint(self.leg["save"])
            self.saved = True

    # -- state ---------------------------------------------------------------------------------

    def _objects(self) -> TrainingObjects:
        assert self.trainer is not None and self.module is not None
        optimizers = list(self.trainer.optimizers)
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        extras = {f"optimizer_{i}": o for i, o in enumerate(optimizers[1:], 1)}
        extras.update({f"scheduler_{i}": s for i, s in enumerate(schedulers[1:], 1)})
        return TrainingObjects(model=self.module, dataloader=[], optimizer=optimizers[0] if optimizers else None,
                               scheduler=schedulers[0] if schedulers else None, extras=extras)

    def _stateful(self) -> bool:
        return state.stateful_loader(self.loader)

    def _shuffled_by_rng(self) -> bool:
        """Whether a plain loader's pass is shuffled from RNG states (a random sampler, or a
        generator of its own), rather than from a seed and the epoch (``DistributedSampler``)."""
        sampler = getattr(self.loader, "sampler", None)
        objs = TrainingObjects(model=self.module, dataloader=self.loader)  # type: ignore[arg-type]
        return isinstance(sampler, torch.utils.data.RandomSampler) or bool(state.data_rng(objs)["generators"])

    def _capture(self, epoch: int, position: int, batch_idx: int, loader_state: Any) -> dict[str, Any]:
        """The full state; its data section says where the next batch comes from: Lightning's
        epoch and ``batch_idx``, the index in the pass, the RNG states a plain loader's pass was
        shuffled from; and a stateful loader's own state."""
        assert self.trainer is not None
        captured = state.capture(self._objects())
        stateful = self._stateful()
        data: dict[str, Any] = {"progress": {
            "epoch": epoch, "batch_in_epoch": position, "step": self.trainer.global_step,
            "epoch_rng": self.epoch_rng if not stateful and self._shuffled_by_rng() else None,
            "lightning_batch_idx": batch_idx}}
        if stateful:
            if loader_state is not None:  # the sampler's generator is part of it
                data["loader"] = loader_state
        else:
            objs = TrainingObjects(model=self.module, dataloader=self.loader)  # type: ignore[arg-type]
            data["generators"] = state.data_rng(objs)["generators"]
        captured["data"] = data
        return captured

    # -- the training DataLoader's iterators ----------------------------------------------------

    def is_train_loader(self, loader: Any) -> bool:
        if self.trainer is None:
            return False
        if self.loader is None:
            train = [dl for dl in _loaders(self.trainer.train_dataloader) if dl is not None]
            if not any(dl is loader for dl in train):
                return False
            if len(train) != 1:
                raise RecipeError(f"the training data holds {len(train)} data loaders; the Lightning resume check "
                                  f"follows one", key=self.key, fix="train on a single DataLoader")
            self.loader = loader
        return loader is self.loader

    def new_iterator(self, loader: Any, create: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """Lightning asks for the next pass over the training data."""
        first = self.iterators == 0
        self.iterators += 1
        skip, shuffle_rng = 0, None
        if first:
            self.meta = describe(TrainingObjects(model=self.module, dataloader=loader, **{
                k: getattr(self._objects(), k) for k in ("optimizer", "scheduler", "extras")}))
            if self.resumed:
                skip, shuffle_rng = self._override_data()
                self.restored = getattr(loader, "next_iter_state", None) if self._stateful() else None
        objs = TrainingObjects(model=self.module, dataloader=loader)  # type: ignore[arg-type]
        if shuffle_rng is not None:  # a confirmation run: shuffle the pass as the uninterrupted run did
            state.set_data_rng(objs, shuffle_rng)
        self.epoch_rng = state.data_rng(objs)
        it = create()
        for _ in range(skip):  # a confirmation run: go on from where the uninterrupted run was
            next(it)
        self.pass_start, self.consumed = int(getattr(it, "_num_yielded", skip)), 0
        return it

    def _reference(self) -> tuple[list[str], dict[str, Any]] | None:
        override = self.leg.get("override")
        if not override:
            return None
        return list(override["components"]), torch.load(override["state"], map_location="cpu", weights_only=True)

    def _override_data(self) -> tuple[int, dict[str, Any] | None]:
        """A confirmation run taking ``data`` from the uninterrupted run, before the first pass
        begins: a stateful loader gets its state; a plain one is shuffled from the same RNG
        states and skips to the same position. Returns the batches to skip and those states."""
        reference = self._reference()
        if reference is None or "data" not in reference[0]:
            return 0, None
        data = reference[1]["data"]
        objs = TrainingObjects(model=self.module, dataloader=self.loader)  # type: ignore[arg-type]
        state.set_data_rng(objs, {"global": {}, "generators": data.get("generators", {})})
        if self._stateful():
            if "loader" in data:
                self.loader.load_state_dict(data["loader"])
            return 0, None
        progress = data["progress"]
        return int(progress["batch_in_epoch"]), progress.get("epoch_rng")

    def _override_at_start(self) -> None:
        """A confirmation run taking the other components from the uninterrupted run, just
        before the first resumed step (where the audit compares them)."""
        reference = self._reference()
        if reference is not None and (components := [c for c in reference[0] if c != "data"]):
            state.restore(self._objects(), reference[1], only=components)


@contextmanager
def _watching(tracker: _Tracker) -> Iterator[None]:
    """Wrap ``__iter__`` of DataLoader and of every subclass that defines its own, in this
    (fresh, single-purpose) process, for the duration of ``fit``."""
    classes, seen = [torch.utils.data.DataLoader], []
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "__iter__" in vars(cls) and cls not in seen:
            seen.append(cls)
    originals = {cls: vars(cls)["__iter__"] for cls in seen}
    busy: list[Any] = []

    def wrap(original: Callable[[Any], Iterator[Any]]) -> Callable[[Any], Iterator[Any]]:
        def __iter__(self: Any) -> Iterator[Any]:
            if busy or not tracker.is_train_loader(self):  # a subclass calling super().__iter__()
                return original(self)
            busy.append(self)
            try:
                return tracker.new_iterator(self, lambda: original(self))
            finally:
                busy.pop()
        return __iter__

    for cls, original in originals.items():
        cls.__iter__ = wrap(original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__iter__ = original  # type: ignore[method-assign]


def _run_leg(case: Any, leg: dict[str, Any], *, seed: int, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    name, start, stop = str(leg["name"]), int(leg["start"]), int(leg["stop"])
    key = case.label
    seed_everything(seed)
    module = make(case.model, case.sys_path, "model")
    if not isinstance(module, pl.LightningModule):
        raise RecipeError(f"the model factory returned a {type(module).__name__}, not a LightningModule",
                          key=case.model, fix="return a lightning.pytorch.LightningModule")
    data = make(case.data, case.sys_path, "data")
    fit_data = {"datamodule": data} if isinstance(data, pl.LightningDataModule) else {"train_dataloaders": data}
    tracker = _Tracker(leg, work, key=key, save_in_loop=case.save == "callback")
    options = {**TRAINER_DEFAULTS, **case.trainer}
    try:
        trainer = pl.Trainer(**options, max_steps=stop, max_epochs=-1, callbacks=[tracker],
                             default_root_dir=str(work / f"{name}-lightning"))
    except Exception as exc:  # noqa: BLE001
        raise RecipeError(f"lightning.Trainer(...) raised {type(exc).__name__}: {_text(exc)}", key=key,
                          fix="check the trainer options") from exc
    with _watching(tracker), recording_loads(TrainingObjects(model=module, dataloader=[])) as calls:
        try:
            trainer.fit(module, ckpt_path=leg.get("load"), **fit_data)
        except TensorParityError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's module or data: any failure becomes one line
            at = f" at step {trainer.global_step + 1}" if tracker.iterators else ""
            raise RecipeError(f"trainer.fit raised {type(exc).__name__}{at}: {_text(exc)}", key=key,
                              fix="run the same fit in Python to see the traceback") from exc
    if len(tracker.records) != stop - start:
        raise RecipeError(f"trainer.fit ran {len(tracker.records)} steps from step {start}, not {stop - start}",
                          key=key, fix="make every training step step the optimizer once (no skipped batches, "
                                       "no gradient accumulation) and the data long enough")
    saved = None
    if leg.get("save"):
        path = Path(leg["save"])
        if not tracker.saved:
            trainer.save_checkpoint(path)
        if not wrote_something(path):
            raise RecipeError(f"trainer.save_checkpoint wrote nothing at step {stop}", path=path, key=key,
                              fix="check the strategy's checkpoint I/O")
        saved = str(path)
    return {"name": name, "start": start, "stop": stop, "records": [r.to_dict() for r in tracker.records],
            "snapshots": tracker.snapshots, "after_load": tracker.after_load, "load_calls": calls,
            "saved": saved, "meta": tracker.meta, "wall_s": time.perf_counter() - started}


def run_legs(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a job's legs with Lightning (the ``runner`` a Lightning check's jobs name)."""
    case = resolve(RecipeSpec.from_dict(job["recipe"]), keep_path=True)
    return [_run_leg(case, leg, seed=int(job["seed"]), work=Path(job["work"])) for leg in job["legs"]]
