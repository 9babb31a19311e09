"""Fresh processes for the legs of a resume check.

Every leg runs in a process of its own that is given only the recipe's name, the seed and the
checkpoint's path. Two ways to get one:

* ``spawn``: a new interpreter per leg (``python -m tensorparity.resume._child``). Interpreters are
  started ahead of time; each imports torch and then waits, having run nothing of the recipe, for
  its one job on stdin. Importing torch and creating the first optimizer (which imports
  ``torch._dynamo``) costs seconds of CPU per process.
* ``fork`` (Linux): one *server* interpreter imports torch, ``torch._dynamo`` and tensorparity once
  and never runs anything else; every leg is a process forked from it, so each starts from the
  same pristine state as a new interpreter — minus the import time. The server lives for the
  Python session (it is reused by later checks and stopped at exit). Forked legs share the
  server's hash seed, so a recipe whose data order depends on ``hash()`` of strings is only caught
  in ``spawn`` mode.

Either way the environment is the parent's minus every ``TENSORPARITY*`` variable (plus the folder
tensorparity is imported from, so that the child imports the same tensorparity).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol

from tensorparity.errors import InternalError
from tensorparity.resume._recipe_errors import RecipeError

__all__ = ["Handle", "Launcher", "child_env", "fork_available", "launcher"]

_MODULE = "tensorparity.resume._child"


def child_env() -> dict[str, str]:
    """The parent's environment without anything tensorparity-specific."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TENSORPARITY")}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def fork_available() -> bool:
    """Whether legs can be forked from a server (Linux only: fork is unsafe elsewhere)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _result(path: Path, log: Path, name: str, code: int | None) -> dict[str, Any]:
    """A finished leg's result, or the error it died of."""
    if not path.is_file():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-400:] if log.is_file() else ""
        raise RecipeError(f"the fresh process running {name} exited{f' with code {code}' if code is not None else ''} "
                          f"before reporting back" + (f"; its last output: {tail}" if tail else ""),
                          fix="run the recipe's steps in Python to see what kills the process (memory, a crash "
                              "in an extension)")
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    error = result.get("error")
    if error:
        if error["kind"] == "internal":
            raise InternalError(f"in the fresh process ({error.get('leg')}): {error['message']}\n"
                                f"{error.get('traceback', '')}")
        raise RecipeError(error["message"], path=error.get("path"), key=error.get("key"), fix=error.get("fix"))
    return result


def _timed_out(name: str, timeout: float) -> RecipeError:
    return RecipeError(f"the leg(s) {name} did not finish within {timeout:g} s and were stopped",
                       fix="ask for fewer steps, or pass a longer timeout (--timeout)")


class Handle(Protocol):
    """A leg's process: wait for its result, or stop it."""

    def wait(self, timeout: float) -> dict[str, Any]: ...

    def discard(self) -> None: ...


class Launcher(Protocol):
    """Starts a job (a list of legs) in a fresh process."""

    isolation: str

    def start(self, job: dict[str, Any]) -> Handle: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# spawn: a new interpreter per job, started ahead of time


def _preload_args(preload: tuple[str, ...]) -> list[str]:
    return ["--preload", ",".join(preload)] if preload else []


class _Spawned:
    def __init__(self, work: Path, index: int, env: dict[str, str], preload: tuple[str, ...] = ()) -> None:
        self.log_path = work / f"child-{index}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/discard()
        self.proc = subprocess.Popen([sys.executable, "-m", _MODULE, *_preload_args(preload)], stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.result_path: Path | None = None
        self.name = ""

    def submit(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.result_path, self.name = Path(job["result"]), ", ".join(str(leg["name"]) for leg in job["legs"])
        try:
            self.proc.stdin.write(json.dumps(job).encode())
            self.proc.stdin.close()
        except BrokenPipeError:  # it died while waiting; wait() reports how
            pass

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.discard()
            raise _timed_out(self.name, timeout) from None
        self._log.close()
        assert self.result_path is not None
        return _result(self.result_path, self.log_path, self.name, code)

    def discard(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin and not self.proc.stdin.closed:
                    self.proc.stdin.close()  # a waiting child reads end-of-input and exits
                self.proc.wait(timeout=2)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


class SpawnLauncher:
    """New interpreters, ``ahead`` of them started before they are needed."""

    isolation = "spawn"

    def __init__(self, work: Path, *, ahead: int = 1, preload: tuple[str, ...] = ()) -> None:
        self.work, self.ahead, self.env, self.preload = work, ahead, child_env(), preload
        self._waiting: list[_Spawned] = []
        self._all: list[_Spawned] = []

    def warm(self, n: int) -> None:
        while len(self._waiting) < n:
            child = _Spawned(self.work, len(self._all), self.env, self.preload)
            self._all.append(child)
            self._waiting.append(child)

    def start(self, job: dict[str, Any]) -> Handle:
        self.warm(1)
        child = self._waiting.pop(0)
        self.warm(self.ahead)
        child.submit(job)
        return child

    def close(self) -> None:
        for child in self._all:
            child.discard()


# ---------------------------------------------------------------------------------------------
# fork: one pristine server per session forks a process per job


class _Server:
    """``python -m tensorparity.resume._child --serve``: reads a job per line, forks, answers the pid."""

    def __init__(self, env: dict[str, str], preload: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log = Path(tempfile.mkstemp(prefix="tensorparity-resume-server-", suffix=".log")[1])
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", _MODULE, "--serve", *_preload_args(preload)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, job: dict[str, Any]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.lock:
            try:
                self.proc.stdin.write(json.dumps(job).encode() + b"\n")
                self.proc.stdin.flush()
                answer: list[str] = []
                for _ in range(100):  # skip anything an import printed before the server began
                    answer = self.proc.stdout.readline().decode(errors="replace").split()
                    if not answer or answer[0] == str(job["id"]):
                        break
            except BrokenPipeError:
                answer = []
        if len(answer) != 2 or answer[0] != str(job["id"]):
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
            raise InternalError(f"the resume-check server did not start a process (answer {answer!r}); its log: {tail}")
        return int(answer[1])

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.unlink(missing_ok=True)


# One server per set of preloaded modules: a plain recipe's legs never see what a framework
# integration preloaded (Lightning).
_SERVERS: dict[tuple[str, ...], _Server] = {}
_SERVER_LOCK = threading.Lock()
# Variables read when the interpreter or a library starts (not later): when one of them changes,
# the server is restarted. Others (PYTEST_CURRENT_TEST...) reach each leg with its job.
_AT_START = ("PYTHON", "LD_", "DYLD_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "CUDA", "NCCL")


def _startup(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.upper().startswith(_AT_START)}


def _server(preload: tuple[str, ...] = ()) -> _Server:
    """The session's server for ``preload``, started on first use (again when it died or a
    start-up variable changed)."""
    env = child_env()
    with _SERVER_LOCK:
        server = _SERVERS.get(preload)
        if server is None or not server.alive() or _startup(server.env) != _startup(env):
            if server is not None:
                server.close()
            server = _SERVERS[preload] = _Server(env, preload)
        return server


@atexit.register
def _stop_server() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].close()


def _gone(pid: int, parent: int) -> bool:
    """Whether the leg ``pid`` forked by the server ``parent`` has ended (a recycled pid is not ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    return len(fields) < 2 or fields[0] == "Z" or int(fields[1]) != parent


class _Forked:
    def __init__(self, pid: int, server: int, job: dict[str, Any]) -> None:
        self.pid, self.server, self.result_path, self.log = pid, server, Path(job["result"]), Path(job["log"])
        self.name = ", ".join(str(leg["name"]) for leg in job["legs"])
        self.done = False

    def wait(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not self.result_path.is_file():
            if _gone(self.pid, self.server):
                break
            if time.monotonic() > deadline:
                self.discard()
                raise _timed_out(self.name, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.done = True
        return _result(self.result_path, self.log, self.name, None)

    def discard(self) -> None:
        if not self.done and not self.result_path.is_file() and not _gone(self.pid, self.server):
            os.kill(self.pid, signal.SIGKILL)  # our own leg, forked for this job
        self.done = True


class ForkLauncher:
    """Legs forked from the session's pristine server."""

    isolation = "fork"

    def __init__(self, work: Path, *, preload: tuple[str, ...] = ()) -> None:
        self.work = work
        self.server = _server(preload)
        self._count = 0
        self._started: list[_Forked] = []

    def start(self, job: dict[str, Any]) -> Handle:
        self._count += 1
        job = {**job, "id": self._count, "log": str(self.work / f"leg-{self._count}.log"), "cwd": os.getcwd(),
               "env": child_env()}
        handle = _Forked(self.server.fork(job), self.server.proc.pid, job)
        self._started.append(handle)
        return handle

    def close(self) -> None:
        for handle in self._started:
            handle.discard()


def launcher(isolation: str, work: Path, *, ahead: int = 1,
             preload: tuple[str, ...] = ()) -> SpawnLauncher | ForkLauncher:
    """The launcher for ``isolation`` (``fork`` or ``spawn``); every process imports ``preload``
    before its job."""
    if isolation == "fork":
        return ForkLauncher(work, preload=preload)
    return SpawnLauncher(work, ahead=ahead, preload=preload)
