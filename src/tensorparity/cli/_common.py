"""What every command shares: exit codes, the error wrapper, the stdout console.

A command parses its options, calls one public function, renders the result and exits. Errors
the user can fix are one line on stderr, ``error: <what failed>; fix: <what to do>``, never a
traceback; bugs in tensorparity are one ``internal error:`` line unless ``TENSORPARITY_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from tensorparity.errors import TensorParityError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "AtolOption",
    "EXIT_DIFFERS",
    "EXIT_ERROR",
    "EXIT_OK",
    "ExactOption",
    "NanUnequalOption",
    "RtolOption",
    "StatisticOption",
    "command",
    "finish",
    "stdout_console",
    "write_atomic",
]

# Tolerance options shared by every command that compares (diff, compare).
ExactOption = Annotated[bool, typer.Option("--exact", help="Bitwise: every byte must match.")]
AtolOption = Annotated[float | None, typer.Option("--atol", metavar="X",
                                                  help="Absolute tolerance (default: torch.testing's per dtype).")]
RtolOption = Annotated[float | None, typer.Option("--rtol", metavar="Y",
                                                  help="Relative tolerance (default: torch.testing's per dtype).")]
StatisticOption = Annotated[str, typer.Option("--statistic", metavar="elementwise|max|mean",
                                              help="Judge every element, the largest error, or the mean error.")]
NanUnequalOption = Annotated[bool, typer.Option("--nan-unequal", help="NaN never equals NaN (default: NaNs in the "
                                                "same places are equal).")]

EXIT_OK = 0
EXIT_DIFFERS = 1  # reserved: "the two things differ" (diff, parity checks)
EXIT_ERROR = 2  # bad input, bad usage, or a bug; same code click uses for usage errors

F = TypeVar("F", bound=Callable[..., Any])


def _debug() -> bool:
    return os.environ.get("TENSORPARITY_DEBUG", "") not in ("", "0")


def _fail(line: str) -> typer.Exit:
    if _debug():
        traceback.print_exc()
    sys.stderr.write(" ".join(line.split()) + "\n")  # exactly one line, whatever the message held
    sys.stderr.flush()
    return typer.Exit(EXIT_ERROR)


def command(func: F) -> F:
    """Run a command body with tensorparity's error contract.

    ``TensorParityError`` -> ``error: <message>`` on stderr, exit 2. Any other exception ->
    ``internal error: <type>: <message> (please report; ...)``, exit 2. typer's own exits and
    usage errors pass through unchanged.

    Example:
        >>> @command
        ... def hello() -> None:
        ...     print("hello")
        >>> hello()
        hello
    """

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except TensorParityError as exc:
            raise _fail(f"error: {exc}") from None
        except KeyboardInterrupt:
            raise _fail("error: interrupted") from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python from complaining
            # about the unflushed stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_OK) from None
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a clean exit
            raise _fail(f"internal error: {type(exc).__name__}: {exc} "
                        "(please report; set TENSORPARITY_DEBUG=1 for the traceback)") from None

    return run  # type: ignore[return-value]


def stdout_console() -> Console:
    """The console people read: stdout, no syntax highlighting of numbers inside user data."""
    from rich.console import Console

    return Console(highlight=False)


def finish(report: Any, *, json_: bool, top: int) -> NoReturn:
    """Print a report (JSON and nothing else, or its rich rendering) and exit with its code."""
    if json_:
        sys.stdout.write(report.to_json() + "\n")
        sys.stdout.flush()
    else:
        report.render(stdout_console(), top=top)
    raise typer.Exit(report.exit_code)


def check_output(out: Path, inputs: list[str], overwrite: bool, *, flag: str = "--overwrite",
                 what: str = "the file") -> None:
    """Refuse before any work is done: an existing file without ``flag``, a file that is (or lies
    inside) an input, a folder, a missing parent folder."""
    for source in inputs:
        try:
            same = Path(source).exists() and out.exists() and os.path.samefile(source, out)
        except OSError:
            same = False
        if same or (Path(source).is_dir() and out.resolve().is_relative_to(Path(source).resolve())):
            raise UsageError(f"refusing to write {what} over (or into) an input", path=out,
                             fix=f"write {what} to another path")
    if out.is_dir():
        raise UsageError("the output is a folder", path=out, fix="give a file name, e.g. map.yaml")
    if out.exists() and not overwrite:
        raise UsageError("the output file exists", path=out, fix=f"pass {flag} to replace it, or choose another path")
    if not out.parent.is_dir():
        raise UsageError("the output folder does not exist", path=out.parent, fix="create it first")


def save_found_mapping(report: Any, path: Path | None) -> None:
    """``--save-map``: write the mapping compare or replay found (YAML, atomically), or say on
    stderr why there is none."""
    if path is None:
        return
    found = getattr(report, "found_mapping", None)
    if found is None:
        sys.stderr.write(f"--save-map: no mapping was found to save (none was needed, or a mapping was given); "
                         f"{path} not written\n")
        return
    write_atomic(path, found.to_yaml(), what="the mapping")


def write_atomic(path: Path, text: str, *, what: str = "the file") -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: a crash
    never leaves a half-written file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.yaml"
        >>> write_atomic(p, "version: 1\\n"); p.read_text()
        'version: 1\\n'
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"could not write {what} ({exc.strerror or exc})", path=path,
                         fix="check free disk space and permissions") from None
