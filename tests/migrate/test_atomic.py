"""atomic_output: the destination is the old version or the new one, never a mix, never gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensorparity import _atomic as atomic  # the one implementation of atomic writes
from tensorparity._atomic import atomic_output, clean_stale, temp_name
from tensorparity.errors import InternalError, UsageError


def _write_folder(path: Path, files: dict[str, str]) -> None:
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_file_is_replaced_and_nothing_else_is_left(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    dest.write_text("old")
    with atomic_output(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.pt.") and tmp.name.endswith(".tmp")
        assert dest.read_text() == "old"  # untouched while the new one is written
        tmp.write_text("new")
    assert dest.read_text() == "new" and os.listdir(tmp_path) == ["w.pt"]


def test_an_error_leaves_the_destination_untouched_and_removes_the_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_output(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert dest.read_text() == "old" and os.listdir(tmp_path) == ["w.pt"]
    # the same for a folder output, and for a destination that did not exist
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "out") as tmp:
        _write_folder(tmp, {"a": "1", "sub/b": "2"})
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["w.pt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_is_swapped_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # the path taken where renameat2(RENAME_EXCHANGE) is missing
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "ckpt"
    _write_folder(dest, {"old-only": "x", "shared": "old"})
    with atomic_output(dest) as tmp:
        _write_folder(tmp, {"shared": "new", "sub/new": "y"})
    assert _tree(dest) == {"shared": "new", "sub/new": "y"}
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_file_can_replace_a_folder_and_back(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write_folder(dest, {"a": "1"})
    with atomic_output(dest) as tmp:
        tmp.write_text("file now")
    assert dest.is_file() and dest.read_text() == "file now"
    with atomic_output(dest) as tmp:
        _write_folder(tmp, {"b": "2"})
    assert _tree(dest) == {"b": "2"} and os.listdir(tmp_path) == ["out"]


def test_backup_keeps_the_old_version_by_hard_link(tmp_path: Path) -> None:
    dest, backup = tmp_path / "w.ckpt", tmp_path / "w.ckpt.bak"
    dest.write_text("old")
    inode = dest.stat().st_ino
    with atomic_output(dest, backup=backup) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and backup.read_text() == "old"
    assert backup.stat().st_ino == inode  # no copy was made: the old inode lives on as the backup
    # a second run replaces the backup atomically too; folders are backed up whole
    with atomic_output(dest, backup=backup) as tmp:
        tmp.write_text("newer")
    assert backup.read_text() == "new"
    folder, folder_backup = tmp_path / "f", tmp_path / "f.bak"
    _write_folder(folder, {"x": "old"})
    with atomic_output(folder, backup=folder_backup) as tmp:
        _write_folder(tmp, {"x": "new"})
    assert _tree(folder) == {"x": "new"} and _tree(folder_backup) == {"x": "old"}
    assert sorted(os.listdir(tmp_path)) == ["f", "f.bak", "w.ckpt", "w.ckpt.bak"]


def test_backup_onto_the_destination_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    dest.write_text("old")
    with pytest.raises(UsageError, match="the backup path is the destination itself"), \
            atomic_output(dest, backup=dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "old" and os.listdir(tmp_path) == ["w.pt"]


def test_misuse_is_reported(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="the output folder does not exist"), \
            atomic_output(tmp_path / "missing" / "w.pt"):
        pass
    with pytest.raises(InternalError, match="nothing was written"), atomic_output(tmp_path / "w.pt"):
        pass
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    dest.write_text("current")
    dead = tmp_path / ".w.pt.999999999.0badc0de.tmp"  # pid 999999999 cannot exist (pid_max < 2^22)
    dead.write_text("torn")
    _write_folder(tmp_path / ".w.pt.999999998.00ff.tmp", {"half": "x"})
    live = tmp_path / f".w.pt.{os.getppid()}.1234abcd.tmp"  # our parent is alive: maybe still writing
    live.write_text("in progress")
    other = tmp_path / ".other.pt.999999999.0badc0de.tmp"  # another destination's: not ours to judge
    other.write_text("x")
    removed = clean_stale(dest)
    assert sorted(p.name for p in removed) == [".w.pt.999999998.00ff.tmp", ".w.pt.999999999.0badc0de.tmp"]
    assert sorted(os.listdir(tmp_path)) == sorted([".other.pt.999999999.0badc0de.tmp", live.name, "w.pt"])
    # atomic_output tidies on entry
    dead.write_text("torn")
    with atomic_output(dest) as tmp:
        tmp.write_text("new")
    assert not dead.exists() and live.exists()


def test_an_old_folder_set_aside_by_a_dead_writer_is_restored(tmp_path: Path) -> None:
    # The two-renames fallback died between "old aside" and "new in": dest is missing.
    dest = tmp_path / "ckpt"
    _write_folder(tmp_path / ".ckpt.999999999.aa.old.tmp", {"weights": "old, complete"})
    _write_folder(tmp_path / ".ckpt.999999999.bb.tmp", {"weights": "new, maybe complete"})
    clean_stale(dest)
    assert _tree(dest) == {"weights": "old, complete"} and os.listdir(tmp_path) == ["ckpt"]


def test_temp_names_are_unique_and_recognisable(tmp_path: Path) -> None:
    names = {temp_name(tmp_path / "m.safetensors").name for _ in range(100)}
    assert len(names) == 100
    assert all(atomic._stale_pattern(tmp_path / "m.safetensors").fullmatch(n) for n in names)
