"""The one output policy every file tensorparity writes follows (reports, traces, mappings,
checkpoints, data-loader states).

- **Refuse, then write.** An existing path is refused unless the user passed ``--overwrite``,
  and an input (or a path inside an input folder) is refused even then; both are checked before
  any work is done (:func:`check_output`).
- **Atomic.** The bytes go to a temporary name beside the destination, are fsynced and renamed
  over it (:func:`atomic_output`, the one implementation: traces, checkpoints, reports, resume
  results): a crash, a full disk or Ctrl-C leaves the old file or the new one, never a torn mix.
- **The user's permissions.** Files are created with ``open()``'s default mode, so the user's
  umask decides (``0o644`` under the usual ``022``), never ``mkstemp``'s ``0o600``.
- **Say what happened.** A failed write is reported from its cause (:func:`write_failure`):
  interrupted, disk full, quota exceeded, permission denied, read-only file system; never a
  guess such as "check free disk space" for a write that Ctrl-C stopped.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tensorparity.errors import InternalError, TensorParityError, UsageError

__all__ = ["atomic_output", "check_output", "clean_stale", "fsync_dir", "fsync_tree", "interrupted", "note_interrupt",
           "refuse_inputs", "temp_name", "write_failure", "write_text"]

_INTERRUPTED = False


def note_interrupt() -> None:
    """Remember that the user pressed Ctrl-C (the CLI's SIGINT handler calls this before raising
    ``KeyboardInterrupt``), so that a writer which turned the interrupt into its own error (torch's
    zip writer raises ``RuntimeError`` when a signal stops it) is still reported as interrupted."""
    global _INTERRUPTED
    _INTERRUPTED = True


def interrupted() -> bool:
    """Whether Ctrl-C was pressed in this process (see :func:`note_interrupt`)."""
    return _INTERRUPTED


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_output(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], overwrite: bool, *,
                 flag: str = "--overwrite", what: str = "the file", folder: bool = False) -> None:
    """Refuse, before any work is done: a path that is (or lies inside) an input, even with
    ``flag``; an existing path without ``flag``; a file where a folder is written or the
    reverse; a missing parent folder.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "a.pt").write_bytes(b"x")
        1
        >>> check_output(d / "new.html", [d / "a.pt"], overwrite=False)  # fine: a new file
        >>> check_output(d / "a.pt", [d / "a.pt"], overwrite=True)
        Traceback (most recent call last):
        ...
        tensorparity.errors.UsageError: ...a.pt: refusing to write the file over (or into) an input; fix: write the file to another path
    """
    out = Path(out)
    refuse_inputs(out, inputs, what)
    if out.exists() or out.is_symlink():
        if not folder and out.is_dir():
            raise UsageError(f"the output is a folder; {what} is a file", path=out,
                             fix="give a file name, e.g. report.html")
        if folder and not out.is_dir():
            raise UsageError(f"the output is a file; {what} is a folder", path=out, fix="give a new folder's name")
        if not overwrite:
            raise UsageError(f"the output {'folder' if folder else 'file'} exists", path=out,
                             fix=f"pass {flag} to replace it, or choose another path")
    if not out.parent.is_dir():
        raise UsageError("the output folder does not exist", path=out.parent, fix="create it first")


def refuse_inputs(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], what: str) -> None:
    """Refuse an output that is an input, lies inside an input folder, or is a folder holding an
    input: no flag allows it.

    Example:
        >>> refuse_inputs("/data/out.pt", ["/data/in.pt", None], "the file")  # elsewhere: fine
    """
    out = Path(out)
    for source in inputs:
        if source is None:
            continue
        src = Path(source)
        try:
            same = src.exists() and out.exists() and os.path.samefile(src, out)
        except OSError:
            same = False
        if (same or src.absolute() == out.absolute() or (src.is_dir() and _inside(out, src))
                or (out.is_dir() and _inside(src, out))):
            raise UsageError(f"refusing to write {what} over (or into) an input", path=out,
                             fix=f"write {what} to another path")


def write_failure(exc: BaseException, what: str, path: str | os.PathLike[str], *,
                  left: str = "the destination was left as it was",
                  error: type[TensorParityError] = UsageError) -> BaseException:
    """The error to raise for a write that failed with ``exc``, said from its cause.

    ``KeyboardInterrupt`` (also when a writer turned it into its own error) stays an interrupt;
    an ``OSError`` is named by its errno; an error whose text says "no space" is a full disk, and
    so is any error when the destination's file system has no room left. Anything else is
    reported as it is, with no guessed cause.

    Example:
        >>> str(write_failure(OSError(errno.ENOSPC, "No space left on device"), "the trace", "/t"))
        '/t: could not write the trace: the disk is full (No space left on device); fix: free disk space, then run the command again; the destination was left as it was'
    """
    if isinstance(exc, KeyboardInterrupt) or interrupted() or isinstance(exc.__context__, KeyboardInterrupt):
        return KeyboardInterrupt()
    if isinstance(exc, TensorParityError):
        return exc
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200]
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC,) or "no space" in text.lower() or _full(Path(path)):
        cause, fix = "the disk is full", "free disk space, then run the command again"
    elif code == errno.EDQUOT or "quota" in text.lower():
        cause, fix = "the disk quota is exceeded", "free space within your quota, or write elsewhere"
    elif code in (errno.EACCES, errno.EPERM):
        cause, fix = "permission denied", "write to a folder you may write to, or fix its permissions"
    elif code == errno.EROFS:
        cause, fix = "the file system is read-only", "write to another file system"
    elif code == errno.EFBIG:
        cause, fix = "the file is larger than this process may write", "raise the file size limit (ulimit -f)"
    elif code == errno.ENAMETOOLONG:
        cause, fix = "the file name is too long", "choose a shorter path"
    elif _size_limit() is not None:
        cause, fix = (f"{type(exc).__name__}; this process may write files of {_size_limit():,} bytes at most",
                      "raise the file size limit (ulimit -f)")
    else:
        cause, fix = (f"{type(exc).__name__}, no cause given",
                      "check the file system (free space, quotas, permissions), then run the command again")
    return error(f"could not write {what}: {cause} ({text})", path=path, fix=f"{fix}; {left}")


def _size_limit() -> int | None:
    """The file size limit of this process (``ulimit -f``), ``None`` where there is none."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _full(path: Path) -> bool:
    """Whether the file system that would hold ``path`` has (almost) no room left."""
    for candidate in (path.parent, *path.parents):
        if candidate.is_dir():
            try:
                return shutil.disk_usage(candidate).free < (1 << 20)
            except OSError:
                return False
    return False


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "the file") -> None:
    """Write ``text`` to ``path`` atomically, with the user's umask (call :func:`check_output`
    first: this replaces ``path`` when it exists).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.yaml"
        >>> write_text(p, "version: 1\\n"); p.read_text(), oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
        ('version: 1\\n', True)
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except (OSError, KeyboardInterrupt) as exc:
        raise write_failure(exc, what, path, left=f"{path.name} was left as it was") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
