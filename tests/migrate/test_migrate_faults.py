"""Faults during a migration: a migration that fails halfway, a tensor that fails while being
written, a non-deterministic one caught by verification, SIGKILL at many points of --in-place, and
a full disk (RLIMIT_FSIZE in a forked child, and an injected writer): the input is always intact
or the new file complete and verified, and nothing partial is left behind."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import Migration, MigrationError, Registry, migrate, read_history

FORK = multiprocessing.get_context("fork")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry(*extra: Migration) -> Registry:
    return Registry("faults", [
        Migration("1.5", "rename", mapping=Mapping([Rule("model.layer{i}.w", "model.layers.{i}.weight")])),
        *extra,
    ], version_field="release")


def write_ckpt(path: Path, *, n: int = 8, numel: int = 1024) -> Path:
    gen = torch.Generator().manual_seed(0)
    model = {f"layer{i}.w": torch.randn(numel, generator=gen) for i in range(n)}
    torch.save({"release": "1.0", "model": model, "epoch": 3}, path)
    return path


def test_a_migration_failing_halfway_leaves_the_input_and_no_output(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "run.pt")
    before = sha(path)

    def boom(tree: Any) -> None:
        tree.set("epoch", 4)
        raise ValueError("half done")

    with pytest.raises(MigrationError, match=r"migration 'boom' \(2.0\) raised ValueError: half done; fix: fix the "
                                             r"migration's function \(nothing was written\)"):
        migrate(path, registry(Migration("2.0", "boom", function=boom)), in_place=True, backup=True)
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_a_tensor_failing_while_written_leaves_nothing_behind(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "run.pt")
    before = sha(path)

    def late(tree: Any) -> None:
        def compute() -> torch.Tensor:
            raise RuntimeError("out of cheese")
        tree.set_lazy("model.zz_last.w", shape=(4,), dtype=torch.float32, compute=compute)

    for options in ({"in_place": True, "backup": True}, {"output": tmp_path / "out.pt"}):
        with pytest.raises(MigrationError, match=r"computing 'model.zz_last.w' raised RuntimeError: out of cheese"):
            migrate(path, registry(Migration("2.0", "late", function=late)), **options)  # type: ignore[arg-type]
        assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_verification_catches_a_non_deterministic_migration(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "run.pt")
    before = sha(path)

    def noisy(tree: Any) -> None:
        tree.set_lazy("model.noise", shape=(8,), dtype=torch.float32, compute=lambda: torch.randn(8))

    with pytest.raises(MigrationError, match=r"does not read back as planned \(.*Value mismatches: 1 → differs\); "
                                             r"nothing was written; fix: a function that computes tensors must be "
                                             r"deterministic"):
        migrate(path, registry(Migration("2.0", "noisy", function=noisy)), in_place=True)
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def _migrate_in_child(path: str) -> None:
    torch.set_num_threads(1)
    migrate(path, registry(), in_place=True)


def _is_stale_temp(name: str) -> bool:
    return name.startswith(".run.pt.") and name.endswith(".tmp")


def test_sigkill_at_random_points_of_an_in_place_migration(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "run.pt", n=48, numel=64 * 1024)  # 12 MiB: long enough to be caught midway
    pristine = tmp_path / "pristine.pt"
    shutil.copyfile(path, pristine)
    original = sha(path)
    expected = tmp_path / "expected.pt"
    start = time.perf_counter()
    child = FORK.Process(target=_migrate_in_child, args=(str(path),))
    child.start()
    child.join()
    full = time.perf_counter() - start
    assert child.exitcode == 0
    shutil.move(path, expected)
    shutil.copyfile(pristine, path)

    # 18 points spread over the whole run (opening, planning, hashing, writing, verifying,
    # renaming), jittered; then 2 runs left to finish (the new file must stand).
    rng = random.Random(0)
    delays: list[float | None] = [full * (i + rng.random()) / 18 for i in range(18)] + [None, None]
    outcomes = {"old": 0, "new": 0}
    for delay in delays:
        child = FORK.Process(target=_migrate_in_child, args=(str(path),))
        child.start()
        if delay is not None:
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type] - a child that already ended is a zombie
        child.join()
        names = [p.name for p in tmp_path.iterdir()]
        assert all(n in ("run.pt", "pristine.pt", "expected.pt") or _is_stale_temp(n) for n in names), names
        if sha(path) == original:
            outcomes["old"] += 1
            continue
        # Not the old file: then the new one, complete, verified and recorded; never torn.
        with tensorparity.open(path) as ckpt:
            assert read_history(ckpt)[-1]["to"] == "1.5"
        same = tensorparity.diff(expected, path, exclude="tensorparity_migrations", weights_only=False)
        assert same.verdict == "identical", same.classic_summary()
        outcomes["new"] += 1
        shutil.copyfile(pristine, path)
    assert outcomes["old"] >= 5 and outcomes["new"] >= 2, outcomes  # both sides of the rename were hit
    # A later run tidies what the killed writers left, and migrates.
    assert migrate(path, registry(), in_place=True).verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.pt", "pristine.pt", "run.pt"]


def _migrate_with_small_file_limit(path: str, limit: int, conn: Any) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        migrate(path, registry(), in_place=True)
        conn.send("no error")
    except tensorparity.TensorParityError as exc:
        conn.send(str(exc))
    except BaseException as exc:  # noqa: BLE001 - report it to the parent
        conn.send(f"{type(exc).__name__}: {exc}")


def test_a_full_disk_in_a_forked_child_is_one_line_and_keeps_the_original(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "run.pt", n=16, numel=16 * 1024)  # 1 MiB
    before = sha(path)
    parent, child_end = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_migrate_with_small_file_limit, args=(str(path), 256 * 1024, child_end))
    child.start()
    message = parent.recv()
    child.join()
    # The process must end normally: no C++ writer aborting on the way out (SIGABRT is -6).
    assert child.exitcode == 0, child.exitcode
    assert "\n" not in message and "could not write the migrated checkpoint" in message, message
    # a file size limit: read off the process's limit, not guessed as a full disk
    assert "fix: raise the file size limit (ulimit -f); the input is untouched" in message, message
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_an_injected_full_disk_is_one_line_on_the_command_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorparity.migrate._migrate as migrating  # where migrate() calls the writer

    path = write_ckpt(tmp_path / "run.pt")
    before = sha(path)
    spec = tmp_path / "faults.py"
    spec.write_text("from tensorparity.mapping import Mapping, Rule\nfrom tensorparity.migrate import Migration, "
                    "Registry\nMIGRATIONS = Registry('faults', [Migration('1.5', 'rename', mapping=Mapping([Rule("
                    "'model.layer{i}.w', 'model.layers.{i}.weight')]))], version_field='release')\n")

    def disk_fills_up(ckpt: Any, dest: Any, **options: Any) -> None:
        with open(dest, "wb") as f:
            f.write(b"PK\x03\x04" + b"\0" * 4096)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))

    monkeypatch.setattr(migrating, "write_checkpoint", disk_fills_up)
    result = CliRunner().invoke(app, ["migrate", str(path), "--migrations", str(spec), "--in-place", "--backup"])
    assert_one_line_error(result, "error: ", "could not write the migrated checkpoint: the disk is full (No space left on device)",
                          "the input is untouched")
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["faults.py", "run.pt"]
