"""Atomic writes: the one implementation every file and folder tensorparity writes goes through
(traces, checkpoints, reports, mappings, resume results, data-loader states).

:func:`atomic_output` yields a temporary name beside the destination, and once the block
succeeds fsyncs it and renames it over the destination (folders are exchanged in one step where
the kernel can); a crash, a full disk or Ctrl-C leaves the old file or the new one, never a torn
mix, and :func:`clean_stale` tidies what a dead writer left. The policy around it (refuse
inputs and existing paths, say why a write failed) is :mod:`tensorparity._output`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tensorparity.errors import InternalError, UsageError

__all__ = ["atomic_output", "clean_stale", "fsync_dir", "fsync_tree", "temp_name"]


# --- atomic replacement ----------------------------------------------------------------------------
# The destination is replaced from a temporary name beside it (same folder, so same file system: the
# final rename cannot become a copy). A folder cannot be renamed over a non-empty folder, so folders
# are *exchanged*: Linux's renameat2(RENAME_EXCHANGE) swaps the two names in one step. Where it is
# missing (another OS, an old kernel, a file system without it) the old folder is first renamed
# aside, then the new one in: a crash between the two renames leaves no destination but a complete
# old copy named ``.<name>.<pid>.<token>.old.tmp``, which clean_stale() (run by every later
# atomic_output() for that destination) renames back. The pid in a temporary's name says whether
# its writer is still alive, so a later run removes only what a dead process left behind.

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temp_name(dest: Path, *, tag: str = "") -> Path:
    """A fresh temporary path beside ``dest``: ``.<name>.<pid>.<token>[.tag].tmp``.

    Example:
        >>> p = temp_name(Path("/data/model.safetensors"))
        >>> p.parent.as_posix(), p.name.startswith(".model.safetensors."), p.suffix
        ('/data', True, '.tmp')
    """
    suffix = f".{tag}" if tag else ""
    # os.urandom(4).hex() is secrets.token_hex(4) without importing secrets (hmac, hashlib, base64)
    # into every command's start-up.
    return dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}{suffix}.tmp"


def _stale_pattern(dest: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(dest.name)}\.(\d+)\.[0-9a-f]+(\.old)?\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_stale(dest: str | os.PathLike[str]) -> list[Path]:
    """Tidy what a killed writer left beside ``dest``; return what was removed or restored.

    Temporaries of processes that are still alive are left alone. When ``dest`` is missing and a
    dead writer left the old folder aside (the non-atomic fallback of a folder swap), the old
    folder is renamed back to ``dest`` instead of being removed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / ".w.pt.999999999.ab12.tmp").write_bytes(b"half")  # a dead writer's leftover
        >>> [p.name for p in clean_stale(d / "w.pt")]
        ['.w.pt.999999999.ab12.tmp']
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = _stale_pattern(dest)
    found: list[tuple[Path, bool]] = []
    for entry in dest.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(1))):
            found.append((entry, m.group(2) is not None))
    done: list[Path] = []
    # Restore first: an old copy set aside is the only complete version when dest is gone.
    for entry, old in sorted(found, key=lambda item: not item[1]):
        if old and not os.path.lexists(dest):
            os.rename(entry, dest)
            fsync_dir(dest.parent)
        else:
            _remove(entry)
        done.append(entry)
    return done


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that the names created, renamed or removed in it survive a power cut;
    nothing where the platform or file system cannot sync folders.

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open folders (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync folders
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder (children before parents).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "a").write_text("x"); fsync_tree(d)
    """
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                fsync_tree(Path(root) / name)
            fsync_dir(Path(root))
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step (Linux ``renameat2``); False where the system cannot."""
    import ctypes  # only here: a folder replacing a folder; not worth every command's start-up

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest``: one atomic rename for files, an exchange for folders."""
    dest_is_dir = dest.is_dir() and not dest.is_symlink()
    if not os.path.lexists(dest) or (not dest_is_dir and not new.is_dir()):
        os.replace(new, dest)
        return
    # A folder on either side: the old one must go, and a rename cannot replace a folder.
    if _exchange(new, dest):
        fsync_dir(dest.parent)
        _remove(new)  # `new` now names the old version
        return
    aside = temp_name(dest, tag="old")
    os.rename(dest, aside)
    os.rename(new, dest)
    fsync_dir(dest.parent)
    _remove(aside)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _backup(dest: Path, backup: Path) -> None:
    """Copy ``dest`` to ``backup`` atomically: hard links where possible (instant, no space).

    Hard links are safe because the destination is only ever *replaced* by a rename, never
    written in place, so the backup's inodes keep the old bytes.
    """
    if backup.resolve() == dest.resolve():
        raise UsageError("the backup path is the destination itself", path=backup,
                         fix="choose another backup path")
    tmp = temp_name(backup)
    try:
        if dest.is_dir():
            shutil.copytree(dest, tmp, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(dest), str(tmp))
        fsync_tree(tmp)
        _install(tmp, backup)
        fsync_dir(backup.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_output(dest: str | os.PathLike[str], *, backup: str | os.PathLike[str] | None = None,
                  fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write into; install it over ``dest`` on success.

    Write a file at the yielded path, or create a folder there and fill it. On normal exit every
    file written is fsynced, ``dest`` (when it exists and ``backup`` is given) is copied to
    ``backup`` (hard links where possible), the new output is renamed over ``dest`` (a folder is
    exchanged with the old one), and the parent folder is fsynced. On an exception ``dest`` is
    untouched and the temporary output removed. A SIGKILL at any point leaves ``dest`` either
    the old complete version or the new complete one; what it leaves beside it is named
    ``.<name>.<pid>.<token>[.old].tmp`` and is tidied by the next ``atomic_output`` for ``dest``
    (see :func:`clean_stale`). The temporary is created by the caller (``open()``, ``mkdir``), so
    the user's umask decides its permissions.

    Args:
        dest: the file or folder to create or replace.
        backup: where to keep the old ``dest`` (ignored when ``dest`` does not exist yet).
        fsync: ``False`` for a file that need not survive a power cut, only a crash of its
            writer (a worker's result file that its parent reads at once): no fsync at all.

    Raises:
        UsageError: the parent folder does not exist.
        InternalError: nothing was written at the temporary path.

    Example:
        >>> import tempfile
        >>> dest = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with atomic_output(dest) as tmp:
        ...     _ = tmp.write_text("new")
        >>> dest.read_text()
        'new'
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        raise UsageError("the output folder does not exist", path=dest.parent, fix="create it first")
    clean_stale(dest)
    tmp = temp_name(dest)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise InternalError(f"nothing was written at the temporary path {tmp}")
        if fsync:
            fsync_tree(tmp)
        if backup is not None and os.path.lexists(dest):
            _backup(dest, Path(backup))
        _install(tmp, dest)
        if fsync:
            fsync_dir(dest.parent)
    except BaseException:
        _remove(tmp)
        raise
