"""The resume check: :func:`resume_check` and the legs it runs.

For ``steps=N, resume_at=K``, every leg in a fresh process (:mod:`._pool`):

1. *uninterrupted*: N steps, a fingerprint per step, the full state at K and at N;
2. *repeat*: the same N steps again (a second process), then K steps in a fresh build and save —
   two uninterrupted runs that differ are nondeterminism, reported as such (exit 2), never as a
   resume bug;
3. *resumed*: a fresh process gets the recipe's name and the checkpoint's path, builds, loads,
   records its state, and runs steps K+1..N.

Each resumed segment is judged with :func:`judge_segment`: step by step
(:func:`~tensorparity.resume.fingerprint.compare_records`), the audit right after the load and at
the end (:func:`~tensorparity.resume.audit.audit`). A failing segment is re-run with each
suspected component taken from the uninterrupted run (:mod:`.confirm`). Several resume points run
side by side; ``chain=True`` resumes K1 → K2 → N, saving again in each resumed process.

:func:`judge_segment` and :class:`RunResult` are the reusable part for runs that tensorparity does
not drive itself (a framework's own loop, resumed through its own checkpoint code).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

from tensorparity.errors import UsageError
from tensorparity.numerics import Tolerance
from tensorparity.report._render import plural
from tensorparity.resume._pool import Handle, Launcher, SpawnLauncher, fork_available, launcher
from tensorparity.resume._ranks import combine
from tensorparity.resume._ranks import judge as judge_ranks
from tensorparity.resume._recipe_errors import NondeterminismError, RecipeError
from tensorparity.resume._resume_report import ResumeLeg, ResumeReport, Segment
from tensorparity.resume._torchrun import TorchrunLauncher
from tensorparity.resume.audit import audit, divergence, state_diff
from tensorparity.resume.confirm import conclude, plan
from tensorparity.resume.fingerprint import StepRecord, compare_records
from tensorparity.resume.recipe import LoadedRecipe, load_recipe

__all__ = ["CheckOptions", "RunResult", "check_options", "judge_segment", "resume_check", "run_check"]

Profile = Literal["bitwise", "dtype"]


@dataclass(frozen=True)
class RunResult:
    """What one leg left behind.

    Attributes:
        name: the leg's name.
        start, stop: the steps before and after it.
        records: one fingerprint per step ``start + 1 .. stop``.
        snapshots: step -> file of the full state after that step.
        after_load: file of the state right after the load (resumed legs).
        load_calls: the non-strict ``load_state_dict`` calls the recipe's ``load`` made.
        meta: what the leg knew about its objects (dropout, loader, extras' classes).
        saved: the checkpoint it saved at ``stop``, if it saved.
        wall_s: seconds the leg took.
        ranks: a distributed leg's result on each rank (rank order); the fields above then
            combine them (:mod:`._ranks`).
        samples: step -> a hash per sample of its batch (distributed legs).
    """

    name: str
    start: int
    stop: int
    records: tuple[StepRecord, ...]
    snapshots: Mapping[int, Path]
    after_load: Path | None = None
    load_calls: tuple[Mapping[str, Any], ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    saved: Path | None = None
    wall_s: float = 0.0
    ranks: tuple[RunResult, ...] = ()
    samples: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_child(cls, data: Mapping[str, Any], *, across: bool = False) -> RunResult:
        if data.get("ranks"):  # a distributed leg: one result per rank
            return combine([cls.from_child(r) for r in data["ranks"]], across=across)
        return cls(str(data["name"]), int(data["start"]), int(data["stop"]),
                   tuple(StepRecord.from_dict(r) for r in data["records"]),
                   {int(k): Path(v) for k, v in data["snapshots"].items()},
                   Path(data["after_load"]) if data.get("after_load") else None, tuple(data.get("load_calls", ())),
                   dict(data.get("meta", {})), Path(data["saved"]) if data.get("saved") else None,
                   float(data.get("wall_s", 0.0)), samples=dict(data.get("samples") or {}))


def judge_segment(reference: RunResult, resumed: RunResult, *, tolerance: Tolerance, accumulate: int = 1,
                  audit_load: bool = True) -> Segment:
    """Judge one resumed segment against the uninterrupted run.

    Args:
        reference: the uninterrupted run; needs snapshots at ``resumed.start`` and ``resumed.stop``.
        resumed: the segment, with its state after the load (``after_load``) and at ``stop``.
        tolerance: how close is close enough.
        accumulate: micro-batches per optimizer step (for the messages).
        audit_load: audit the state right after the load (a confirmation run skips it).

    Raises:
        RecipeError: the segment ran a different number of steps than asked for.
    """
    start, stop = resumed.start, resumed.stop
    if len(resumed.records) != stop - start:
        raise RecipeError(f"the resumed run from step {start} ran {len(resumed.records)} steps, not {stop - start}",
                          fix="make the data loader yield at least as many batches as asked for")
    if resumed.ranks:
        return judge_ranks(reference, resumed, tolerance=tolerance, accumulate=accumulate, audit_load=audit_load)
    rows = compare_records(reference.records, resumed.records, tolerance)
    findings, notes = (), ()  # type: ignore[var-annotated]
    if audit_load and resumed.after_load is not None:
        findings, notes = audit(state_diff(reference.snapshots[start], resumed.after_load, tolerance=tolerance),
                                at=start, meta=resumed.meta, load_calls=resumed.load_calls, rows=rows,
                                accumulate=accumulate)
    end, _ = audit(state_diff(reference.snapshots[stop], resumed.snapshots[stop], tolerance=tolerance), at=stop,
                   when="end", meta=resumed.meta, accumulate=accumulate)
    diverged = divergence(rows, end, stop=stop)
    if diverged is None and any(f.component == "buffers" for f in findings):
        # A non-persistent buffer that differs after the load but changes nothing is a cache
        # recomputed before use (built lazily on the first forward): worth a note, not a finding.
        cache = next(f for f in findings if f.component == "buffers")
        findings = tuple(f for f in findings if f.component != "buffers")
        notes = (*notes, f"{cache.message.partition(':')[0]} right after the load, yet the run matches at every "
                         f"step and at the end: recomputed before use (a cache)")
    if diverged is not None and audit_load and resumed.after_load is not None and not findings:
        notes = (*notes, "no component differs right after the load (the model's non-persistent buffers included), "
                         "yet the run diverges: the cause is state tensorparity cannot see (module-level counters or "
                         "caches, a generator the recipe does not return in extras, RNG drawn while the data "
                         "loader's iterator was recreated)")
    return Segment(start, stop, rows, findings, end, diverged, notes, resumed.wall_s)


def _options(steps: Any, resume_at: Any, chain: Any, tolerance: Any, seed: Any, timeout: Any, threads: Any) -> tuple[
        list[tuple[int, ...]], Tolerance, str]:
    problems = []
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        problems.append(f"steps must be an integer >= 2, not {steps!r}")
        steps = 2
    points = [resume_at] if isinstance(resume_at, Integral) else list(resume_at) if isinstance(resume_at, Sequence) \
        else []
    if not points or any(isinstance(k, bool) or not isinstance(k, Integral) for k in points):
        problems.append(f"resume_at must be a step number or a list of them, not {resume_at!r}")
        points = []
    points = [int(k) for k in points]
    bad = [k for k in points if not 1 <= k < steps]
    if bad:
        problems.append(f"resume point(s) {', '.join(map(str, bad))} not between 1 and steps - 1 = {steps - 1}")
    if len(set(points)) != len(points):
        problems.append(f"resume points repeat: {points}")
    if isinstance(tolerance, Tolerance):
        tol, profile = tolerance, "bitwise" if tolerance.exact else "custom"
    elif tolerance in ("bitwise", "dtype"):
        tol, profile = Tolerance(exact=tolerance == "bitwise"), str(tolerance)
    else:
        problems.append(f"tolerance must be 'bitwise', 'dtype' or a Tolerance, not {tolerance!r}")
        tol, profile = Tolerance(exact=True), "bitwise"
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"seed must be an integer, not {seed!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        problems.append(f"timeout must be a number of seconds > 0, not {timeout!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append(f"threads must be a positive integer or None, not {threads!r}")
    if chain not in (True, False):
        problems.append(f"chain must be True or False, not {chain!r}")
    if problems:
        raise UsageError("; ".join(problems), fix="e.g. resume_check(recipe, steps=10, resume_at=[4, 6])")
    legs = [tuple(sorted(points))] if chain else [(k,) for k in sorted(points)]
    return legs, tol, profile


class _Check:
    """One resume check in progress: the pool, the work folder, the legs' results."""

    def __init__(self, loaded: LoadedRecipe, pool: Launcher, work: Path, *, steps: int, seed: int,
                 tolerance: Tolerance, timeout: float, threads: int | None, runner: str | None = None,
                 nproc: int = 1, resume_nproc: int = 1) -> None:
        self.loaded, self.pool, self.work, self.runner = loaded, pool, work, runner
        self.steps, self.seed, self.tol, self.timeout, self.threads = steps, seed, tolerance, timeout, threads
        self.nproc, self.resume_nproc = nproc, resume_nproc
        self._jobs = 0

    def start(self, legs: list[dict[str, Any]], *, resumed: bool = False) -> Handle:
        self._jobs += 1
        job = {"recipe": self.loaded.spec.to_dict(), "seed": self.seed, "threads": self.threads,
               "work": str(self.work), "result": str(self.work / f"result-{self._jobs}.json"), "legs": legs}
        if self.runner:  # a framework's legs (tensorparity.integrations): same jobs, its own runner
            job["runner"] = self.runner
        if isinstance(self.pool, TorchrunLauncher):  # ranks of a distributed leg (tensorparity.resume._dist)
            job["nproc"], job["timeout"] = self.resume_nproc if resumed else self.nproc, self.timeout
        return self.pool.start(job)

    def results(self, child: Handle) -> dict[str, RunResult]:
        across = self.nproc != self.resume_nproc
        return {leg["name"]: RunResult.from_child(leg, across=across) for leg in child.wait(self.timeout)["legs"]}

    @staticmethod
    def leg(name: str, start: int, stop: int, **options: Any) -> dict[str, Any]:
        return {"name": name, "start": start, "stop": stop, **options}

    def ckpt(self, name: str) -> str:
        return str(self.work / f"ckpt-{name}")

    def segment_job(self, points: tuple[int, ...], index: int, load: str, **options: Any) -> dict[str, Any]:
        start = points[index]
        stop = points[index + 1] if index + 1 < len(points) else self.steps
        name = f"resume-{'-'.join(map(str, points))}-{index}" + options.pop("suffix", "")
        save = self.ckpt(f"{'-'.join(map(str, points))}-{stop}") if index + 1 < len(points) else None
        return self.leg(name, start, stop, load=load, snapshots=[stop], save=save, **options)


def _check_reference(ref: RunResult, rep: RunResult, saves: Mapping[int, RunResult], tol: Tolerance) -> None:
    """Two uninterrupted runs that differ, or a save leg that trained differently, are bad input."""
    fix = ("seed every RNG inside build(), call torch.use_deterministic_algorithms(True), avoid nondeterministic "
           "kernels" + (", or compare with tolerance='dtype' (--tolerance dtype)" if tol.exact else ""))
    judged = "bitwise" if tol.exact else "within tolerance"
    for row in compare_records(ref.records, rep.records, tol):
        if not row.match:
            raise NondeterminismError(f"the two uninterrupted runs already differ at step {row.step} "
                                      f"({', '.join(row.differences())}): training is not reproducible, so a "
                                      f"resumed run cannot be judged {judged}", fix=fix)
    pairs = list(zip(ref.ranks, rep.ranks, strict=True)) if ref.ranks else [(ref, rep)]
    for rank, (a, b) in enumerate(pairs):
        final = state_diff(a.snapshots[a.stop], b.snapshots[b.stop], tolerance=tol)
        if not final.passed:
            where = f" on rank {rank}" if ref.ranks else ""
            raise NondeterminismError(f"the two uninterrupted runs end in different states{where} ({final.summary()}): "
                                      f"training is not reproducible, so a resumed run cannot be judged {judged}",
                                      fix=fix)
    for k, run in saves.items():
        bad = next((r for r in compare_records(ref.records, run.records, tol) if not r.match), None)
        if bad is not None:
            raise RecipeError(f"a second build() in one process trained differently from the first (step {bad.step}: "
                              f"{', '.join(bad.differences())}), so the checkpoint of step {k} cannot be trusted",
                              fix="keep all training state in the objects build() returns (no module-level "
                                  "counters, caches or iterators)")


def resume_check(
    recipe: Any,
    *,
    steps: int,
    resume_at: int | Sequence[int],
    chain: bool = False,
    tolerance: Profile | Tolerance | None = None,
    seed: int = 0,
    confirm: bool = True,
    timeout: float = 600.0,
    threads: int | None = 1,
    isolation: Literal["fork", "spawn"] | None = None,
    workdir: str | Path | None = None,
    nproc: int = 1,
    resume_nproc: int | None = None,
) -> ResumeReport:
    """Prove that save → fresh process → load → continue equals uninterrupted training, and name
    what the checkpoint forgot when it does not.

    Args:
        recipe: a :class:`~tensorparity.resume.Recipe`: its name (``"pkg.mod:Recipe"``,
            ``"path/recipe.py:Recipe"``), its class, or an instance a fresh process can re-create
            (module-level, or a dataclass with plain fields).
        steps: steps per run (micro-batches under gradient accumulation).
        resume_at: the step(s) to save after and resume from, each in ``1 .. steps - 1``.
        chain: resume at every point in turn in one run (K1 → K2 → ... → steps) instead of once
            per point.
        tolerance: ``"bitwise"`` (the default, except across world sizes), ``"dtype"``
            (``torch.testing`` tolerances per dtype; the default when ``resume_nproc`` differs from
            ``nproc``: gradients are reduced in another order) or a
            :class:`~tensorparity.Tolerance`. Batches always compare bitwise.
        seed: python, numpy and torch are seeded with it before every ``build()``.
        confirm: re-run a failing leg with each suspected component taken from the uninterrupted
            run, to confirm the diagnosis.
        timeout: seconds any one process may take.
        threads: ``torch.set_num_threads`` in every process (the same in all, so that CPU
            reductions split the same way). One thread is fastest for small recipes, whose legs
            run side by side; ``None`` keeps torch's default.
        isolation: how each leg gets its fresh process: ``"fork"`` (Linux default) forks it from a
            server that imported torch once and never runs anything else; ``"spawn"`` starts a
            new interpreter per leg (seconds of imports each; also catches data orders that
            depend on the interpreter's hash seed).
        workdir: keep the checkpoints, states and logs in a new folder inside this one (default:
            a temporary folder, removed afterwards).
        nproc: ranks of every leg: above 1, each leg runs under ``torchrun`` (gloo on CPU, nccl
            with a GPU) and the recipe's own ``save``/``load`` (DCP) is called on every rank; each
            rank's state is audited and a finding names the rank it belongs to.
        resume_nproc: ranks of the resumed legs (default ``nproc``): save on ``nproc`` ranks,
            resume on ``resume_nproc`` through DCP's resharding. A rank's own state (its RNG) cannot
            be resharded; it is left out of the comparison, and a note says so.

    Raises:
        RecipeError: the recipe failed to build, step, save or load, saved nothing, or ran short.
        NondeterminismError: the two uninterrupted runs already differ.
        UsageError: an option is wrong.

    Example:
        >>> import tensorparity
        >>> report = tensorparity.resume_check("tensorparity.examples.resume_recipes:TinyRecipe",
        ...                                    steps=6, resume_at=3)  # doctest: +SKIP
        >>> report.verdict  # doctest: +SKIP
        'pass'
    """
    began = time.perf_counter()
    options = check_options(steps=steps, resume_at=resume_at, chain=chain, tolerance=tolerance, seed=seed,
                            confirm=confirm, timeout=timeout, threads=threads, isolation=isolation, nproc=nproc,
                            resume_nproc=resume_nproc)
    return run_check(load_recipe(recipe), options, workdir=workdir, began=began)


@dataclass(frozen=True)
class CheckOptions:
    """:func:`resume_check`'s options, checked (what :func:`run_check` takes).

    Attributes:
        legs: the resume points of each leg (``[(3,), (6,)]``, or one chain ``[(3, 6)]``).
        tolerance, profile: the tolerance and its name (``bitwise``, ``dtype``, ``custom``).
        steps, seed, confirm, timeout, threads, isolation: as :func:`resume_check` takes them.
        nproc, resume_nproc: ranks saving and resuming (1: one process, no ``torchrun``).
        notes: what the report should say about the options (a tolerance chosen for the user).
    """

    legs: list[tuple[int, ...]]
    tolerance: Tolerance
    profile: str
    steps: int
    seed: int
    confirm: bool
    timeout: float
    threads: int | None
    isolation: str
    nproc: int = 1
    resume_nproc: int = 1
    notes: tuple[str, ...] = ()

    @property
    def distributed(self) -> bool:
        """Whether the legs run under ``torchrun`` (any side on more than one rank)."""
        return max(self.nproc, self.resume_nproc) > 1


def _ranks(nproc: Any, resume_nproc: Any) -> tuple[int, int]:
    problems = []
    for name, value in (("nproc", nproc), ("resume_nproc", resume_nproc)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be a positive integer, not {value!r}")
    if nproc is None:
        problems.append("nproc must be a positive integer, not None")
    if problems:
        raise UsageError("; ".join(problems), fix="e.g. resume_check(recipe, steps=6, resume_at=3, nproc=2, "
                                                  "resume_nproc=1)")
    return int(nproc), int(nproc if resume_nproc is None else resume_nproc)


def check_options(*, steps: Any, resume_at: Any, chain: Any = False, tolerance: Any = None, seed: Any = 0,
                  confirm: Any = True, timeout: Any = 600.0, threads: Any = 1, isolation: Any = None,
                  nproc: Any = 1, resume_nproc: Any = None) -> CheckOptions:
    """Check :func:`resume_check`'s options all at once (a framework integration takes the same).

    Raises:
        UsageError: every problem found, in one line.

    Example:
        >>> check_options(steps=8, resume_at=[6, 3]).legs
        [(3,), (6,)]
    """
    nproc, resume_nproc = _ranks(nproc, resume_nproc)
    notes: tuple[str, ...] = ()
    if nproc != resume_nproc and tolerance is None:
        tolerance = "dtype"
        notes = (f"saved on {plural(nproc, 'rank')} and resumed on {resume_nproc}: the gradients are reduced over "
                 f"another number of ranks, so the runs cannot agree bitwise; compared with dtype tolerances",)
    elif nproc != resume_nproc and (tolerance == "bitwise" or getattr(tolerance, "exact", False)):
        raise UsageError(f"a bitwise comparison cannot hold when saving on {plural(nproc, 'rank')} and resuming on "
                         f"{resume_nproc}: the gradients are reduced over another number of ranks",
                         fix="pass tolerance='dtype' (--tolerance dtype) or leave the tolerance out")
    legs, tol, profile = _options(steps, resume_at, chain, "bitwise" if tolerance is None else tolerance, seed,
                                  timeout, threads)
    if confirm not in (True, False):
        raise UsageError(f"confirm must be True or False, not {confirm!r}", fix="pass confirm=False to skip re-runs")
    if isolation is None:
        isolation = "fork" if fork_available() else "spawn"
    if isolation not in ("fork", "spawn") or (isolation == "fork" and not fork_available()):
        raise UsageError(f"isolation must be 'fork' (Linux) or 'spawn', not {isolation!r}",
                         fix="pass isolation='spawn', or leave it out")
    return CheckOptions(legs, tol, profile, steps, seed, confirm, float(timeout), threads, isolation, nproc,
                        resume_nproc, notes)


def run_check(loaded: LoadedRecipe, options: CheckOptions, *, workdir: str | Path | None = None,
              runner: str | None = None, preload: tuple[str, ...] = (), began: float | None = None) -> ResumeReport:
    """Run a resume check of ``loaded`` with checked ``options``: the legs, the judging, the
    confirmations, the report.

    ``runner`` (``"module:function"``) runs every leg instead of tensorparity's own loop (a
    framework's trainer: :mod:`tensorparity.integrations.lightning`); ``preload`` is imported by
    every fresh process before its job.
    """
    began = time.perf_counter() if began is None else began
    keep = workdir is not None
    if keep:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    work = Path(tempfile.mkdtemp(prefix="tensorparity-resume-", dir=workdir))
    if options.distributed:
        _distributable(loaded, runner, options)
    pool: Launcher = (TorchrunLauncher(work, nproc=options.nproc, threads=options.threads) if options.distributed
                      else launcher(options.isolation, work, ahead=1 if options.confirm else 0, preload=preload))
    try:
        if isinstance(pool, SpawnLauncher):
            pool.warm(min(2 + len(options.legs) + int(options.confirm), 5))
        check = _Check(loaded, pool, work, steps=options.steps, seed=options.seed, tolerance=options.tolerance,
                       timeout=options.timeout, threads=options.threads, runner=runner, nproc=options.nproc,
                       resume_nproc=options.resume_nproc)
        report = _run(check, options.legs, profile=options.profile, confirm=options.confirm, began=began)
        return dataclasses.replace(report, notes=(*options.notes, *report.notes)) if options.notes else report
    finally:
        pool.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _distributable(loaded: LoadedRecipe, runner: str | None, options: CheckOptions) -> None:
    """A distributed check needs tensorparity's own loop and the recipe's own (DCP) checkpoint."""
    if runner is not None:
        raise UsageError(f"nproc={options.nproc}, resume_nproc={options.resume_nproc}: a framework's own trainer "
                         f"cannot run the legs under torchrun yet", fix="check it with nproc=1")
    if not loaded.own_checkpoint:
        raise RecipeError(f"nproc={max(options.nproc, options.resume_nproc)} needs the recipe's own save()/load() "
                          f"(called on every rank): tensorparity's default checkpoint is for one process",
                          key=loaded.spec.text, fix="give the recipe save(objs, path)/load(objs, path) that use "
                                                    "torch.distributed.checkpoint (see "
                                                    "tensorparity.examples.distributed_recipes)")


def _run(check: _Check, legs: list[tuple[int, ...]], *, profile: str, confirm: bool, began: float) -> ResumeReport:
    n = check.steps
    points = sorted({p for leg in legs for p in leg})
    first_points = sorted({leg[0] for leg in legs})
    a = check.start([check.leg("uninterrupted", 0, n, snapshots=[*points, n])])
    b = check.start([check.leg("repeat", 0, n, snapshots=[n])]
                    + [check.leg(f"save-{k}", 0, k, save=check.ckpt(str(k))) for k in first_points])
    rep = check.results(b)
    saves = {k: rep[f"save-{k}"] for k in first_points}
    running = {leg: check.start([check.segment_job(leg, 0, str(saves[leg[0]].saved), after_load=True)], resumed=True)
               for leg in legs}
    ref = check.results(a)["uninterrupted"]
    _check_reference(ref, rep["repeat"], saves, check.tol)
    acc = check.loaded.accumulate
    done: dict[tuple[int, ...], list[tuple[Segment, str]]] = {}
    for leg, child in running.items():
        segments: list[tuple[Segment, str]] = []
        load = str(saves[leg[0]].saved)
        for index in range(len(leg)):
            if index:
                child = check.start([check.segment_job(leg, index, load, after_load=True)], resumed=True)
            run = next(iter(check.results(child).values()))
            segments.append((judge_segment(ref, run, tolerance=check.tol, accumulate=acc), load))
            load = str(run.saved) if run.saved else load
        done[leg] = segments
    if confirm:  # every leg's re-runs side by side, then judged
        started = {leg: _start_confirmations(check, ref, leg, segments) for leg, segments in done.items()}
        out = [_finish_confirmations(check, ref, leg, segments, started[leg]) for leg, segments in done.items()]
    else:
        out = [ResumeLeg(leg, tuple(s for s, _ in segments)) for leg, segments in done.items()]
    meta = ref.meta
    return ResumeReport(
        recipe=check.loaded.spec.text, steps=n, legs=tuple(out), tolerance=check.tol, profile=profile,
        checkpoint=("the recipe's own save()/load()" if check.loaded.own_checkpoint
                    else "tensorparity's default save/load (everything stateful)"),
        accumulate=acc, steps_per_epoch=meta.get("steps_per_epoch"),
        reference=f"2 runs in fresh processes agree at every step and in the final state ({profile})",
        isolation=_isolation(check),
        wall_s=time.perf_counter() - began)


def _isolation(check: _Check) -> str:
    if not isinstance(check.pool, TorchrunLauncher):
        return check.pool.isolation
    where = "nccl, one GPU per rank" if _cuda() else "gloo on CPU"
    ranks = f"{check.nproc} rank{'s' if check.nproc > 1 else ''}"
    if check.resume_nproc != check.nproc:
        ranks += f", resumed on {check.resume_nproc}"
    return f"every leg under torchrun ({ranks}; {where})"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


_Started = list[tuple[tuple[str, ...], Handle]]


def _start_confirmations(check: _Check, ref: RunResult, leg: tuple[int, ...],
                         segments: list[tuple[Segment, str]]) -> _Started:
    """Re-run the leg's first failing segment once per plan entry, each with its components
    taken from the uninterrupted run right after the load."""
    index = next((i for i, (s, _) in enumerate(segments) if not s.passed), None)
    if index is None:
        return []
    failing, load = segments[index]
    started = []
    for n, components in enumerate(plan(failing.findings)):
        override: dict[str, Any] = {"components": list(components), "state": str(ref.snapshots[failing.start])}
        if ref.ranks:  # each rank takes its own state (the same rank's; rank 0's across world sizes)
            same = len(ref.ranks) == check.resume_nproc
            override["state_by_suffix"] = {f"-rank{r}": str(ref.ranks[r if same else 0].snapshots[failing.start])
                                           for r in range(check.resume_nproc)}
        job = check.segment_job(leg, index, load, override=override, suffix=f"-confirm-{n}")
        job["save"] = None
        started.append((components, check.start([job], resumed=True)))
    return started


def _finish_confirmations(check: _Check, ref: RunResult, leg: tuple[int, ...], segments: list[tuple[Segment, str]],
                          started: _Started) -> ResumeLeg:
    all_segments = [s for s, _ in segments]
    index = next((i for i, s in enumerate(all_segments) if not s.passed), None)
    if index is None or not started:
        return ResumeLeg(leg, tuple(all_segments))
    judged = []
    for components, child in started:
        run = next(iter(check.results(child).values()))
        judged.append((components, judge_segment(ref, run, tolerance=check.tol, accumulate=check.loaded.accumulate,
                                                 audit_load=False)))
    confirmations, findings = conclude(judged, all_segments[index].findings)
    all_segments[index] = dataclasses.replace(all_segments[index], findings=findings)
    return ResumeLeg(leg, tuple(all_segments), confirmations)
