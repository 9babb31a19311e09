"""The resume check of a real ``lightning.Trainer`` run, resumed through ``fit(ckpt_path=...)``.

You give a factory for the ``LightningModule``, one for the data (a ``LightningDataModule`` or
the training ``DataLoader``) and the ``Trainer`` options; :func:`lightning_resume_check` then
runs, each in a fresh process (:mod:`tensorparity.resume._pool`, with Lightning imported once
by the fork server):

1. ``Trainer(max_steps=N).fit(...)``, twice (two uninterrupted runs that differ are
   nondeterminism, reported as such);
2. ``Trainer(max_steps=K).fit(...)`` and ``trainer.save_checkpoint(...)`` from
   ``on_train_batch_end`` of step K, as ``ModelCheckpoint(every_n_train_steps=K)`` saves
   (``save="after_fit"``: once ``fit`` has returned);
3. ``Trainer(max_steps=N).fit(..., ckpt_path=...)`` on freshly built objects.

A callback records every step's fingerprint and the full state (module, optimizers, schedulers,
RNGs, data position) where needed; judging, the component audit, the confirmation re-runs and
the :class:`~tensorparity.resume.ResumeReport` are the plain resume check's
(:func:`tensorparity.resume.resume_check`). What the check found about Lightning itself is in
``docs/resume.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tensorparity._resolve import FactoryError, resolve_object
from tensorparity.errors import MissingDependencyError, UsageError
from tensorparity.numerics import Tolerance
from tensorparity.resume._resume_report import ResumeReport
from tensorparity.resume.recipe import LoadedRecipe, RecipeSpec, _module_location, defining_module, spec_of
from tensorparity.resume.runner import check_options, run_check

__all__ = ["LightningCase", "lightning_resume_check"]

_RUNNER = "tensorparity.integrations._lightning_leg:run_legs"
# Set by the check itself: how long each run is, and the callback that records it.
_RESERVED = ("max_steps", "max_epochs", "min_steps", "min_epochs", "max_time", "callbacks", "default_root_dir")
_SAVES = ("callback", "after_fit")


@dataclass(frozen=True)
class LightningCase:
    """What a fresh process needs to rebuild a Lightning run: the factories' names and the
    trainer options (plain JSON values, so that it travels to the process as data).

    Attributes:
        model: ``package.module:function`` or ``/abs/path/file.py:function`` returning the
            ``LightningModule`` (a class works too: it is called without arguments).
        data: the same for the data: a ``LightningDataModule`` or the training ``DataLoader``.
        trainer: keyword arguments for ``lightning.Trainer`` on top of
            :data:`tensorparity.integrations._lightning_leg.TRAINER_DEFAULTS`.
        save: ``callback`` (``trainer.save_checkpoint`` in ``on_train_batch_end`` of the save
            step) or ``after_fit``.
        sys_path: folders a fresh process appends to ``sys.path`` to import the factories.

    Example:
        >>> case = LightningCase(model="my.models:make", data="my.data:loader")
        >>> case.label
        'Lightning: model my.models:make, data my.data:loader'
    """

    model: str
    data: str
    trainer: dict[str, Any] = field(default_factory=dict)
    save: str = "callback"
    sys_path: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"Lightning: model {self.model}, data {self.data}"


def _require_lightning() -> None:
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("lightning is not installed, so no Lightning run can be checked",
                                     fix="pip install 'tensorparity[lightning]'") from exc


def _name(factory: Any, role: str) -> RecipeSpec:
    """The name a fresh process imports ``factory`` by (checked: it imports and resolves here)."""
    if isinstance(factory, str):
        try:
            spec = spec_of(factory)
        except FactoryError as exc:
            raise UsageError(exc.message, key=role, fix=exc.fix) from None
    elif callable(factory) and hasattr(factory, "__qualname__") and hasattr(factory, "__module__"):
        module = defining_module(f"the {role} factory", factory.__qualname__, factory.__module__, error=UsageError,
                                 fix_local="define it at module level, or pass its name",
                                 fix_import="pass its name: 'package.module:function' or 'path/to/file.py:function'")
        spec = _module_location(module, factory.__qualname__)
    else:
        raise UsageError(f"the {role} must be given as a factory (a function, a class or its name), not a "
                         f"{type(factory).__name__}: every run builds its own in a fresh process",
                         fix=f"pass e.g. 'mypkg.train:make_{role}' or the function itself")
    try:
        resolve_object(spec.text)  # it must import in the fresh process too: fail here, before any run
    except FactoryError as exc:
        raise UsageError(exc.message, key=role, fix=exc.fix) from None
    return spec


def _trainer_options(trainer: Mapping[str, Any] | None) -> dict[str, Any]:
    import lightning.pytorch as pl

    options = dict(trainer or {})
    problems = []
    known = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        problems.append(f"lightning.Trainer has no option(s) {', '.join(map(repr, unknown))}")
    reserved = sorted(k for k in options if k in _RESERVED)
    if reserved:
        problems.append(f"{', '.join(map(repr, reserved))} {'is' if len(reserved) == 1 else 'are'} set by the check "
                        f"(steps=, resume_at=, its own callback)")
    if options.get("accumulate_grad_batches", 1) != 1:
        problems.append("accumulate_grad_batches must be 1: the check counts one optimizer step per batch")
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError):
        problems.append("the trainer options must be plain values (numbers, strings, lists, dicts): they travel to "
                        "fresh processes")
    if problems:
        raise UsageError("; ".join(problems), key="trainer",
                         fix="e.g. trainer={'gradient_clip_val': 1.0, 'precision': '32-true'}; add callbacks in "
                             "LightningModule.configure_callbacks()")
    return options


def lightning_resume_check(
    model: Any,
    data: Any,
    *,
    steps: int,
    resume_at: int | Sequence[int],
    trainer: Mapping[str, Any] | None = None,
    save: Literal["callback", "after_fit"] = "callback",
    chain: bool = False,
    tolerance: Literal["bitwise", "dtype"] | Tolerance = "bitwise",
    seed: int = 0,
    confirm: bool = True,
    timeout: float = 600.0,
    threads: int | None = 1,
    isolation: Literal["fork", "spawn"] | None = None,
    workdir: str | Path | None = None,
) -> ResumeReport:
    """Prove that a Lightning run saved at step K and resumed in a fresh process with
    ``trainer.fit(..., ckpt_path=...)`` trains exactly like the uninterrupted run — and name what
    differs when it does not.

    Args:
        model: the ``LightningModule`` factory: a module-level function or class, or its name
            (``"mypkg.train:make_model"``, ``"path/to/train.py:make_model"``).
        data: the data factory, likewise: it returns a ``LightningDataModule`` or the training
            ``DataLoader`` (one; a ``StatefulDataLoader`` resumes mid-epoch).
        steps: optimizer steps per run (``max_steps``).
        resume_at: the step(s) to save after and resume from, each in ``1 .. steps - 1``.
        trainer: more ``lightning.Trainer`` options (plain values); the defaults are CPU,
            deterministic, no logger, progress bar or checkpoint callback.
        save: ``"callback"``: ``trainer.save_checkpoint`` in ``on_train_batch_end`` of step K,
            as ``ModelCheckpoint`` does mid-training; ``"after_fit"``: ``fit(max_steps=K)``
            returns first.
        chain, tolerance, seed, confirm, timeout, threads, isolation, workdir: as for
            :func:`tensorparity.resume.resume_check`.

    Raises:
        MissingDependencyError: lightning is not installed.
        UsageError: an option is wrong, or a factory cannot be imported.
        RecipeError: a factory, the trainer or ``fit`` raised, or a run trained a different
            number of steps.
        NondeterminismError: the two uninterrupted runs already differ.

    Example:
        >>> from tensorparity.integrations.lightning import lightning_resume_check
        >>> report = lightning_resume_check("train.py:make_model", "train.py:make_data",
        ...                                 steps=8, resume_at=[3, 4])  # doctest: +SKIP
        >>> print(report.legs[0].diagnosis())  # doctest: +SKIP
        resume at 3: step 4 differs first: the batch (the resumed run got step 1's), ...
    """
    _require_lightning()
    options = check_options(steps=steps, resume_at=resume_at, chain=chain, tolerance=tolerance, seed=seed,
                            confirm=confirm, timeout=timeout, threads=threads, isolation=isolation)
    if chain:
        raise UsageError("chain=True is not supported for Lightning runs (yet)",
                         fix="check each resume point on its own: resume_at=[k1, k2]")
    if save not in _SAVES:
        raise UsageError(f"save must be 'callback' or 'after_fit', not {save!r}",
                         fix="save='callback' saves inside the loop, as ModelCheckpoint does")
    model_spec, data_spec = _name(model, "model"), _name(data, "data")
    folders = tuple(dict.fromkeys((*model_spec.sys_path, *data_spec.sys_path)))
    case = LightningCase(model_spec.text, data_spec.text, _trainer_options(trainer), save, folders)
    loaded = LoadedRecipe(case, spec_of(case), accumulate=1, own_checkpoint=True)
    report = run_check(loaded, options, workdir=workdir, runner=_RUNNER, preload=("lightning.pytorch",))
    how = ("trainer.save_checkpoint() in on_train_batch_end, as ModelCheckpoint saves" if save == "callback"
           else "trainer.save_checkpoint() after fit(max_steps=K) returned")
    return dataclasses.replace(report, recipe=case.label, notes=(*report.notes, *_notes(report)),
                               checkpoint=f"Lightning: {how}; resumed with Trainer.fit(ckpt_path=...)")


def _notes(report: ResumeReport) -> list[str]:
    """What the findings mean for a Lightning user: the two known gaps and their fixes."""
    notes = []
    if report.isolation == "fork":
        notes.append("the fork server imported lightning.pytorch as well (imports only: no run)")
    load = [f for f in report.findings if f.when == "load"]
    if any(f.component.startswith("rng.") or "shuffle was drawn from" in f.message for f in load):
        notes.append("Lightning's checkpoint holds no RNG state: a resumed run draws (shuffles, dropout) from the "
                     "fresh process's seeded state. Save them in LightningModule.on_save_checkpoint and restore them "
                     "in on_load_checkpoint (tensorparity.resume.rng_state / set_rng_state)")
    if any(f.component == "data" and f.message.startswith("data loader restarted") for f in load):
        notes.append("a DataLoader without state_dict() restarts its pass when Lightning resumes mid-epoch (Lightning "
                     "warns of it); torchdata's StatefulDataLoader is saved in the checkpoint and resumes in place")
    return notes
