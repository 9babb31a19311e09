"""convert under faults: SIGKILL at random points, a full disk, a file-size limit.

The converting process is a fork of the test process (torch already imported), so a kill costs
milliseconds. After every kill the destination must be the old complete checkpoint or the new
one, complete and bitwise equal to the source; anything else left behind must be a recognisable
``.<name>.<pid>.<token>.tmp`` that the next run removes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import re
import resource
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from tensorparity.migrate import convert
from tensorparity.numerics import Tolerance

FORK = multiprocessing.get_context("fork")
EXACT = Tolerance(exact=True)


def _weights(seed: int, n: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(128, 256, generator=gen) for i in range(n)}  # 128 KiB each


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _run_and_kill(src: Path, dst: Path, fmt: str, delay: float) -> None:
    child = FORK.Process(target=_convert_quietly, args=(src, dst, fmt))
    child.start()
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()


def _convert_quietly(src: Path, dst: Path, fmt: str) -> None:
    convert(src, dst, format=fmt, overwrite=True)


def _state_of(dst: Path, old: dict[str, torch.Tensor], new_src: Path) -> str:
    """'old' or 'new' when ``dst`` is one of the two complete checkpoints; fails otherwise."""
    with tensorparity.open(dst) as ckpt:
        if tensorparity.diff(old, ckpt, tolerance=EXACT).verdict == "identical":
            return "old"
        report = tensorparity.diff(new_src, ckpt, tolerance=EXACT)
        assert report.verdict == "identical", f"{dst} is neither the old nor the new checkpoint: {report.summary()}"
        return "new"


@pytest.mark.parametrize(("fmt", "name", "kills"), [("safetensors", "out.safetensors", 20), ("torch", "out.pt", 8),
                                                    ("safetensors-sharded", "out", 8)])
def test_sigkill_at_random_points_never_tears_the_destination(tmp_path: Path, fmt: str, name: str, kills: int) -> None:
    old, src, dst = _weights(1), tmp_path / "src.pt", tmp_path / name
    torch.save(_weights(2), src)
    options: dict[str, Any] = {"max_shard_size": "1MB"} if "sharded" in fmt else {}
    convert(tensorparity.open(old), dst, format=fmt, **options)
    convert_fmt = fmt
    start = time.perf_counter()  # how long one whole conversion takes in a forked child
    child = FORK.Process(target=_convert_quietly, args=(src, tmp_path / f"timing_{name}", convert_fmt))
    child.start()
    child.join()
    took = time.perf_counter() - start
    assert child.exitcode == 0
    stale = re.compile(rf"\.{re.escape(name)}\.\d+\.[0-9a-f]+(\.old)?\.tmp")
    seen: dict[str, int] = {"old": 0, "new": 0, "left temporaries": 0}
    rng = random.Random(f"{fmt}-kills")

    def kill_at(delay: float) -> None:
        if seen["new"]:  # put the old one back, so that every kill has something to tear
            convert(tensorparity.open(old), dst, format=fmt, overwrite=True, **options)
        _run_and_kill(src, dst, convert_fmt, delay)
        seen[_state_of(dst, old, src)] += 1
        leftovers = [n for n in _listing(tmp_path) if n not in ("src.pt", name, f"timing_{name}")]
        assert all(stale.fullmatch(n) for n in leftovers), leftovers
        seen["left temporaries"] += bool(leftovers)

    for delay in sorted(rng.uniform(0, took) for _ in range(kills)):
        kill_at(delay)
    # On a busy machine the write can be a sliver of the run: a few more kills, later in it, until
    # one has landed during the write (every kill is still checked the same way).
    for delay in sorted(rng.uniform(0.3 * took, took) for _ in range(16)):
        if seen["old"] and seen["left temporaries"]:
            break
        kill_at(delay)
    assert seen["old"] and seen["left temporaries"], seen  # kills landed before and during the write
    # The next run removes what the killed ones left, and completes.
    convert(src, dst, format=fmt, overwrite=True)
    assert _state_of(dst, old, src) == "new"
    assert _listing(tmp_path) == sorted(["src.pt", name, f"timing_{name}"])


def _nemo(tmp_path: Path) -> Path:
    folder = tmp_path / "nemo_src"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(yaml.safe_dump({"target": "a.B"}))
    torch.save(_weights(3, n=8), folder / "model_weights.ckpt")
    with tarfile.open(tmp_path / "model.nemo", "w:") as tar:
        tar.add(folder, arcname=".")
    return tmp_path / "model.nemo"


def _cli_with_file_size_limit(args: list[str], limit: int, pipe: Any) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = CliRunner().invoke(app, args)
    pipe.send((result.exit_code, result.stdout, result.stderr))


@pytest.mark.parametrize(("fmt", "name"), [("torch", "out.pt"), ("safetensors", "out.safetensors"),
                                           ("safetensors-sharded", "out"), ("dcp", "out"), ("nemo", "out.nemo")])
def test_a_file_size_limit_gives_one_line_and_leaves_the_old_destination(tmp_path: Path, fmt: str, name: str) -> None:
    src = _nemo(tmp_path)
    dst = tmp_path / name
    if fmt in ("safetensors-sharded", "dcp"):
        dst.mkdir()
        (dst / "keep.txt").write_text("old")
    else:
        dst.write_bytes(b"old")
    parent, child_end = FORK.Pipe()
    child = FORK.Process(target=_cli_with_file_size_limit,
                         args=(["convert", str(src), str(dst), "--format", fmt, "--overwrite"], 200_000, child_end))
    child.start()
    code, stdout, stderr = parent.recv()
    child.join()
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"error: {dst}: could not write the converted checkpoint: "), stderr
    if fmt != "dcp":  # DCP's own torch.save reports the short write in its own words
        assert "the file is larger than this process may write (File too large)" in stderr, stderr
    else:  # no errno: the cause is read off the process's limit, not guessed
        assert "this process may write files of 200,000 bytes at most" in stderr, stderr
    assert "fix: raise the file size limit (ulimit -f); the destination was left as it was" in stderr
    assert "free disk space" not in stderr
    assert (dst / "keep.txt").read_text() == "old" if dst.is_dir() else dst.read_bytes() == b"old"
    assert _listing(tmp_path) == sorted(["model.nemo", "nemo_src", name])


_CLONE_NEWNS, _CLONE_NEWUSER, _MS_REC, _MS_PRIVATE = 0x00020000, 0x10000000, 0x4000, 0x40000


def _on_a_full_tmpfs(src: Path, folder: Path, pipe: Any) -> None:
    """In a private mount namespace: a 256 KiB tmpfs at ``folder``, an old file on it, a convert
    that cannot fit. Reports what the CLI said and what the tmpfs holds afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNS if os.geteuid() == 0 else _CLONE_NEWNS | _CLONE_NEWUSER
    if libc.unshare(flags) != 0 or libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0 \
            or libc.mount(b"tmpfs", bytes(folder), b"tmpfs", 0, b"size=256k") != 0:
        pipe.send(("skip", os.strerror(ctypes.get_errno())))
        return
    (folder / "out.safetensors").write_bytes(b"old")
    result = CliRunner().invoke(app, ["convert", str(src), str(folder / "out.safetensors"), "--overwrite"])
    pipe.send((result.exit_code, result.stderr, (folder / "out.safetensors").read_bytes(), _listing(folder)))


def test_a_full_disk_gives_one_line_and_leaves_the_old_file(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    torch.save(_weights(4, n=4), src)  # 512 KiB: cannot fit in 256 KiB
    (tmp_path / "small").mkdir()
    parent, child_end = FORK.Pipe()
    child = FORK.Process(target=_on_a_full_tmpfs, args=(src, tmp_path / "small", child_end))
    child.start()
    answer = parent.recv()
    child.join()
    if answer[0] == "skip":
        pytest.skip(f"cannot mount a small tmpfs here ({answer[1]}); the file-size-limit test covers the path")
    code, stderr, old, listing = answer
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "could not write the converted checkpoint: the disk is full (No space left on device)" in stderr
    assert old == b"old" and listing == ["out.safetensors"]
