"""``python -m tensorparity.resume._dist JOB.json``: one rank of a distributed leg, under ``torchrun``.

Every rank joins the process group (gloo on CPU, nccl where there is a GPU), imports the recipe,
and runs the job's legs like a one-process leg (:func:`tensorparity.resume._child.run_leg`): build,
the recipe's ``load`` (DCP), training, snapshots, the recipe's ``save``. What differs:

* a snapshot holds the model and optimizer as *full* state dicts (``get_state_dict`` with
  ``full_state_dict=True``: fully qualified names, every shard gathered), so states compare
  across ranks and world sizes; everything else (RNG, data position, extras) is the rank's own;
* files are per rank (``...-rank<R>.pt``) and so is the result (``<result>-rank<R>.json``);
* each batch is also hashed sample by sample, so that the batch a step trained on over all ranks
  together can be compared with a run on another number of ranks.

A rank that fails writes its error and exits at once with code 1: ``torchrun`` then stops the
other ranks (which may be waiting for it in a collective) instead of leaving them hanging.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tensorparity._atomic import atomic_output
from tensorparity.resume import state
from tensorparity.resume._child import _error, run_leg
from tensorparity.resume.fingerprint import hash_batch
from tensorparity.resume.recipe import RecipeSpec, TrainingObjects, check, resolve

__all__ = ["capture", "main", "restore", "sample_hashes"]


def _full(t: Any) -> Any:
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def capture(objs: TrainingObjects, *, inside_group: bool = False) -> dict[str, Any]:
    """:func:`tensorparity.resume.state.capture` with the model and optimizer as full state dicts
    (collectives: every rank calls it at the same point)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    out = state.capture(objs, inside_group=inside_group)
    options = StateDictOptions(full_state_dict=True)
    out["model"] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                    for k, v in get_model_state_dict(objs.model, options=options).items()}
    if objs.optimizer is not None:
        out["optimizer"] = _cpu(get_optimizer_state_dict(objs.model, objs.optimizer, options=options))
    if "grads" in out:
        out["grads"] = {n: _full(g).cpu() for n, g in out["grads"].items()}
    return out


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _full(value).detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def restore(objs: TrainingObjects, reference: dict[str, Any], *, only: list[str]) -> None:
    """Put components of a :func:`capture` back (a confirmation run): the model and optimizer
    through ``set_state_dict`` (full state dicts), the rest like one process does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    if "model" in only:
        set_model_state_dict(objs.model, reference["model"], options=options)
    if "optimizer" in only and objs.optimizer is not None:
        set_optimizer_state_dict(objs.model, objs.optimizer, reference["optimizer"], options=options)
    rest = [c for c in only if c not in ("model", "optimizer")]
    if rest:
        state.restore(objs, reference, only=rest)


def sample_hashes(batch: Any) -> list[str]:
    """One hash per sample (row 0 of every tensor of the batch): a batch split over ranks hashes
    to the same multiset as the whole batch on one rank."""
    leaves: list[torch.Tensor] = []
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            leaves.append(item)
        elif isinstance(item, dict):
            stack.extend(item[k] for k in sorted(item, key=repr))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    n = leaves[0].shape[0] if leaves and leaves[0].dim() else 0
    if not n or any(t.dim() == 0 or t.shape[0] != n for t in leaves):
        return [hash_batch(batch)]
    return [hash_batch([t[i] for t in leaves]) for i in range(n)]


def _init(timeout: float) -> tuple[int, int]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def run_job(job: dict[str, Any]) -> int:
    """Run a job's legs on this rank and write this rank's result file; the exit code."""
    rank = int(os.environ.get("RANK", "0"))
    result: dict[str, Any] = {"legs": [], "error": None, "pid": os.getpid(), "rank": rank}
    leg_name: str | None = None
    work = Path(job["work"])
    try:
        rank, world = _init(float(job.get("timeout", 600)))
        result.update(rank=rank, world=world)
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        spec = RecipeSpec.from_dict(job["recipe"])
        loaded = check(resolve(spec, keep_path=True), spec)
        for leg in job["legs"]:
            leg_name = str(leg["name"])
            samples: dict[str, list[str]] = {}
            out = run_leg(loaded, leg, seed=int(job["seed"]), work=work, suffix=f"-rank{rank}", capture=capture,
                          restore=restore, on_batch=lambda step, batch: samples.__setitem__(str(step),
                                                                                           sample_hashes(batch)))
            out["samples"] = samples
            out["rank"], out["world"] = rank, world
            result["legs"].append(out)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides what it is
        result["error"] = _error(exc, leg_name)
    # Renamed into place whole, not fsynced: it only has to outlive this process (see _child.py).
    with atomic_output(f"{job['result']}-rank{rank}.json", fsync=False) as tmp:
        tmp.write_text(json.dumps(result), encoding="utf-8")
    if result["error"]:
        return 1  # torchrun stops the other ranks, which may wait for this one in a collective
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    code = run_job(job)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # No atexit handlers (nothing may wait for the other ranks) and no interpreter teardown: gloo's
    # threads can abort it (torch: "terminate called without an active exception", about one run
    # in three on CPU), which would turn a leg that succeeded into a failed one.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
