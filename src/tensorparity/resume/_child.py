"""``python -m tensorparity.resume._child``: the fresh processes that run the legs of a resume check.

Without arguments the process imports torch and tensorparity, then blocks on stdin for its one job
(so a parent can start it ahead of time while it has nothing but those imports). With
``--serve`` it is the fork server: it reads one job per line and forks a process per job, which
cuts every tie to the server (stdin, stdout, cwd, environment) before running it.

A job is one JSON document: the recipe's name, the seed, a work folder, and the legs to run —
each a fresh ``build()`` followed by an optional load (the checkpoint path is all it gets from an
earlier leg), an optional component override (a confirmation run), training from ``start`` to
``stop`` with snapshots, and an optional save. The result is a JSON file in the work folder; what
the recipe prints goes to the process's log. A job with ``"runner": "module:function"`` runs
that function instead (legs a framework's own trainer drives), in the same fresh process.
``--preload a.b,c`` imports those modules once, before any job (a framework that takes seconds to
import: Lightning), and runs nothing of them.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.optim
import torch.utils.data

from tensorparity._atomic import atomic_output
from tensorparity.errors import TensorParityError
from tensorparity.resume import state
from tensorparity.resume._loop import build, describe, guarded, inside_group, recording_loads, train, wrote_something
from tensorparity.resume._recipe_errors import RecipeError
from tensorparity.resume.fingerprint import state_hashes
from tensorparity.resume.recipe import LoadedRecipe, RecipeSpec, check, resolve

__all__ = ["main", "run_job", "run_leg", "serve"]


def _snapshot(loaded: LoadedRecipe, objs: Any, step: int, path: Path, capture: Callable[..., Any]) -> str:
    torch.save(capture(objs, inside_group=inside_group(loaded, step)), path)
    return str(path)


def run_leg(loaded: LoadedRecipe, leg: dict[str, Any], *, seed: int, work: Path, suffix: str = "",
            capture: Callable[..., Any] = state.capture, restore: Callable[..., None] = state.restore,
            on_batch: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """Run one leg and say what happened (records, snapshot files, load calls, saved path).

    A rank of a distributed leg (:mod:`._dist`) names its files with ``suffix``, captures and
    restores states its own way, and sees every batch through ``on_batch``.
    """
    started = time.perf_counter()
    name, start, stop = str(leg["name"]), int(leg["start"]), int(leg["stop"])
    objs = build(loaded, seed)
    out: dict[str, Any] = {"name": name, "start": start, "stop": stop, "snapshots": {}, "after_load": None,
                           "load_calls": [], "saved": None, "meta": describe(objs)}
    if leg.get("load"):
        path = Path(leg["load"])
        if loaded.own_checkpoint:
            built = state_hashes(objs.model.state_dict())
            with recording_loads(objs) as calls, guarded(loaded, "load()"):
                loaded.recipe.load(objs, path)
            now = state_hashes(objs.model.state_dict())
            for call in calls:
                if call["owner"] == "model":
                    # Skipped keys that load() changed anyway (re-initialised them): they do not
                    # keep the values build() gave them.
                    call["rebuilt"] = [k for k in call["missing"] if built.get(k) != now.get(k)]
            out["load_calls"] = calls
        else:
            state.load(objs, path)
    override = leg.get("override")
    if override:
        path = override.get("state_by_suffix", {}).get(suffix, override["state"])
        reference = torch.load(path, map_location="cpu", weights_only=True)
        restore(objs, reference, only=override["components"])
    if leg.get("after_load"):
        out["after_load"] = _snapshot(loaded, objs, start, work / f"{name}-after-load{suffix}.pt", capture)
    wanted = {int(s) for s in leg.get("snapshots", ())}

    def after_step(step: int) -> None:
        if step in wanted:
            out["snapshots"][str(step)] = _snapshot(loaded, objs, step, work / f"{name}-state-{step}{suffix}.pt",
                                                    capture)

    records = train(loaded, objs, start=start, stop=stop, after_step=after_step, on_batch=on_batch)
    if leg.get("save"):
        path = Path(leg["save"])
        if loaded.own_checkpoint:
            with guarded(loaded, "save()", step=stop):
                loaded.recipe.save(objs, path)
        else:
            state.save(objs, path, inside_group=inside_group(loaded, stop))
        if not wrote_something(path):
            raise RecipeError(f"the recipe's save() wrote nothing at step {stop}", path=path,
                              key=loaded.spec.text, fix="write the checkpoint to the path save() is given "
                                                        "(a file there, or a folder with files in it)")
        out["saved"] = str(path)
    out["records"] = [r.to_dict() for r in records]
    out["wall_s"] = time.perf_counter() - started
    return out


def _error(exc: BaseException, leg: str | None) -> dict[str, Any]:
    if isinstance(exc, TensorParityError):
        return {"kind": "recipe" if isinstance(exc, RecipeError) else "usage", "message": exc.message,
                "path": exc.path, "key": exc.key, "fix": exc.fix, "leg": leg}
    return {"kind": "internal", "message": f"{type(exc).__name__}: {exc}", "leg": leg,
            "traceback": traceback.format_exc()}


def run_job(job: dict[str, Any]) -> None:
    """Run a job's legs and write its result file (errors included)."""
    work = Path(job["work"])
    result: dict[str, Any] = {"legs": [], "error": None, "pid": os.getpid()}
    leg_name: str | None = None
    try:
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        if job.get("runner"):
            # Legs tensorparity's loop does not drive (a framework's own trainer): a function
            # ``module:name`` that takes the job and returns the legs' results (RunResult dicts).
            module, _, name = str(job["runner"]).partition(":")
            result["legs"] = list(getattr(importlib.import_module(module), name)(job))
        else:
            spec = RecipeSpec.from_dict(job["recipe"])
            loaded = check(resolve(spec, keep_path=True), spec)
            for leg in job["legs"]:
                leg_name = str(leg["name"])
                result["legs"].append(run_leg(loaded, leg, seed=int(job["seed"]), work=work))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides what it is
        result["error"] = _error(exc, leg_name)
    # Renamed into place whole (the parent reads it once this process exits); no fsync: it only
    # has to outlive this process, not a power cut.
    with atomic_output(job["result"], fsync=False) as tmp:
        tmp.write_text(json.dumps(result), encoding="utf-8")


def _become_leg(job: dict[str, Any], channel: Any) -> None:
    """In a process just forked from the server: cut every tie to it, run the job, exit."""
    code = 0
    try:
        os.close(channel.fileno())  # the server's answers are none of the leg's business
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # data-loader workers must be waitable again
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        run_job(job)
    except BaseException:  # noqa: BLE001 - nothing may escape into the server's loop
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001,S110 - exiting anyway
                pass
        os._exit(code)


def _preload(argv: list[str]) -> None:
    """Import the modules named after ``--preload`` (importing only: no job has run yet)."""
    names = argv[argv.index("--preload") + 1] if "--preload" in argv[:-1] else ""
    if "--serve" in argv and (torch.version.cuda is not None or torch.version.hip is not None):
        return  # as for torch._dynamo in serve(): an import that touched CUDA would break every fork
    for name in filter(None, names.split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001,S110 - an optimisation only: the leg imports it (and fails) itself
            pass


def serve() -> int:
    """The fork server: one job per line on stdin, one ``<id> <pid>`` line back per fork."""
    if torch.version.cuda is None and torch.version.hip is None:
        # Creating the first optimizer imports torch._dynamo (seconds): once here, not in every
        # leg. Not with a GPU build: the import might initialise the CUDA driver, after which
        # forked processes cannot use CUDA.
        try:
            importlib.import_module("torch._dynamo")
        except Exception:  # noqa: BLE001,S110 - an optimisation only
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked legs are reaped by the kernel
    # The answers get stdout to themselves; anything else written there goes to the log.
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become_leg(job, channel)
        channel.write(f"{job['id']} {pid}\n".encode())
        channel.flush()
    return 0


def main() -> int:
    """Read one job from stdin, run it, write the result file (``--serve``: be the fork server)."""
    _preload(sys.argv[1:])
    if "--serve" in sys.argv[1:]:
        return serve()
    raw = sys.stdin.buffer.read()
    if not raw.strip():
        return 0
    run_job(json.loads(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
