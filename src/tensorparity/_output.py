"""The one output policy every file tensorparity writes follows (reports, traces, mappings,
checkpoints, data-loader states).

- **Refuse, then write.** An existing path is refused unless the user passed ``--overwrite``,
  and an input (or a path inside an input folder) is refused even then; both are checked before
  any work is done (:func:`check_output`).
- **Atomic.** The bytes go to a temporary name beside the destination, are fsynced and renamed
  over it (:func:`tensorparity._atomic.atomic_output`, the one implementation: traces,
  checkpoints, reports, resume results): a crash, a full disk or Ctrl-C leaves the old file or the new one, never a torn mix.
- **The user's permissions.** Files are created with ``open()``'s default mode, so the user's
  umask decides (``0o644`` under the usual ``022``), never ``mkstemp``'s ``0o600``.
- **Say what happened.** A failed write is reported from its cause (:func:`write_failure`):
  interrupted, disk full, quota exceeded, permission denied, read-only file system; never a
  guess such as "check free disk space" for a write that Ctrl-C stopped.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tensorparity._atomic import atomic_output
from tensorparity.errors import TensorParityError, UsageError

__all__ = ["check_output", "interrupted", "note_interrupt", "refuse_existing", "refuse_inputs", "write_failure",
           "write_text"]

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
        refuse_existing(out, overwrite, flag=flag)
    if not out.parent.is_dir():
        raise UsageError("the output folder does not exist", path=out.parent, fix="create it first")


def refuse_existing(out: str | os.PathLike[str], overwrite: bool, *, flag: str = "--overwrite") -> None:
    """Refuse an output path that exists (a file, a folder or a link), unless ``overwrite``.

    Example:
        >>> import tempfile
        >>> refuse_existing(Path(tempfile.mkdtemp()), overwrite=False)
        Traceback (most recent call last):
        ...
        tensorparity.errors.UsageError: ...: the output folder exists; fix: pass --overwrite to replace it, or choose another path
    """
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise UsageError(f"the output {'folder' if out.is_dir() else 'file'} exists", path=out,
                         fix=f"pass {flag} to replace it, or choose another path")


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
        >>> umask = os.umask(0); _ = os.umask(umask)
        >>> write_text(p, "version: 1\\n"); p.read_text(), oct(p.stat().st_mode & 0o777) == oct(0o666 & ~umask)
        ('version: 1\\n', True)
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except (OSError, KeyboardInterrupt) as exc:
        raise write_failure(exc, what, path, left=f"{path.name} was left as it was") from None
