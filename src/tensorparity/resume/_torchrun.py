"""Distributed legs: every job of a resume check with ``nproc > 1`` runs under ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node N -m tensorparity.resume._dist JOB``
starts N ranks (a free rendezvous port each time, so checks run side by side); the job is a JSON
file in the work folder, each rank writes ``<result>-rank<R>.json``. The launcher runs in a session
of its own: a leg past its timeout is stopped with its whole process group, ranks included, so a
hung rank (a collective that never completes) never hangs the check. torchrun puts every rank in
a session of its own, so the ranks are found as torchrun's descendants and stopped one by one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tensorparity.resume._pool import _result, _timed_out, child_env
from tensorparity.resume._recipe_errors import RecipeError

__all__ = ["TorchrunLauncher"]

_MODULE = "tensorparity.resume._dist"


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux ``/proc``; none elsewhere), children first found."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


class _Job:
    """One ``torchrun`` of a job: wait for every rank's result, or stop them all."""

    def __init__(self, job: dict[str, Any], nproc: int, env: dict[str, str], log: Path) -> None:
        self.nproc, self.log_path, self.result = nproc, log, str(job["result"])
        self.name = ", ".join(str(leg["name"]) for leg in job["legs"])
        path = Path(job["work"]) / f"{Path(self.result).stem}.job.json"
        path.write_text(json.dumps(job), encoding="utf-8")
        self._log: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in wait()/discard()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
             "-m", _MODULE, str(path)], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)

    def _kill(self) -> None:
        # torchrun starts every rank in a session of its own: find them (and what they started)
        # before stopping torchrun, whose group holds only itself.
        for pid in _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's own session
        except ProcessLookupError:
            pass
        self.proc.wait()

    def wait(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            code = self.proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            self.discard()
            raise _timed_out(f"{self.name} ({self.nproc} ranks)", timeout) from None
        self._kill()  # a rank torchrun left behind, if any
        self._log.close()
        ranks: list[dict[str, Any]] = []
        failed: RecipeError | None = None
        for rank in range(self.nproc):
            path = Path(f"{self.result}-rank{rank}.json")
            if not path.is_file():
                continue
            try:
                ranks.append(_result(path, self.log_path, f"{self.name} on rank {rank}", code))
            except RecipeError as exc:
                failed = failed or RecipeError(f"on rank {rank} of {self.nproc}: {exc.message}", path=exc.path,
                                               key=exc.key, fix=exc.fix)
        if failed is not None:
            raise failed
        if len(ranks) != self.nproc:
            missing = [r for r in range(self.nproc) if not Path(f"{self.result}-rank{r}.json").is_file()]
            tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
            raise RecipeError(f"torchrun running {self.name} exited with code {code} before rank(s) "
                              f"{', '.join(map(str, missing))} reported back" + (f"; its last output: {tail}" if tail
                                                                                  else ""),
                              fix="run the recipe under torchrun yourself to see what kills the ranks (memory, a "
                                  "crash in a collective, a missing backend)")
        return {"legs": [{**rank_legs[0], "ranks": [r["legs"][i] for r in ranks]}
                         for i, rank_legs in enumerate(zip(*(r["legs"] for r in ranks), strict=True))]}

    def discard(self) -> None:
        if self.proc.poll() is None:
            self._kill()
        if not self._log.closed:
            self._log.close()


class TorchrunLauncher:
    """Starts each job under ``torchrun`` with the job's ``nproc`` ranks."""

    isolation = "torchrun"

    def __init__(self, work: Path, *, nproc: int, threads: int | None) -> None:
        self.work, self.nproc = work, nproc
        self.env = child_env()
        # torchrun would set 1 (with a warning) for several ranks: the same number in every rank.
        self.env["OMP_NUM_THREADS"] = str(threads or 1)
        self._count = 0
        self._started: list[_Job] = []

    def start(self, job: dict[str, Any]) -> _Job:
        self._count += 1
        nproc = int(job.get("nproc") or self.nproc)
        handle = _Job(job, nproc, self.env, self.work / f"torchrun-{self._count}.log")
        self._started.append(handle)
        return handle

    def close(self) -> None:
        for handle in self._started:
            handle.discard()
