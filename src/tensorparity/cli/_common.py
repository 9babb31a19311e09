"""What every command shares: exit codes, the error wrapper, the stdout console.

A command parses its options, calls one public function, renders the result and exits. Errors
the user can fix are one line on stderr, ``error: <what failed>; fix: <what to do>``, never a
traceback; bugs in tensorparity are one ``internal error:`` line unless ``TENSORPARITY_DEBUG=1``.

Light on purpose (typer and the standard library only): the library, and torch with it, is
imported when a command runs, not when the CLI starts, so that ``tensorparity --help`` is instant.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from tensorparity.cli._options import TOP

if TYPE_CHECKING:
    from rich.console import Console

    from tensorparity.report import Report

__all__ = [
    "EXIT_DIFFERS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "check_output",
    "command",
    "emit_json",
    "fail_json",
    "finish",
    "report_stream",
    "save_found_mapping",
    "stdout_console",
]

EXIT_OK = 0
EXIT_DIFFERS = 1  # reserved: "the two things differ" (diff, parity checks)
EXIT_ERROR = 2  # bad input, bad usage, or a bug; same code click uses for usage errors

F = TypeVar("F", bound=Callable[..., Any])


EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's 128 + SIGINT


def report_stream() -> Any:
    """:func:`tensorparity.report._stream.report_stream`: the stdout the command started with."""
    from tensorparity.report._stream import report_stream as stream

    return stream()


def emit_json(text: str) -> None:
    """:func:`tensorparity.report._stream.emit_json`: one JSON document on the report stream."""
    from tensorparity.report._stream import emit_json as emit

    emit(text)


def stdout_console() -> Console:
    """:func:`tensorparity.report._stream.stdout_console`: the console people read."""
    from tensorparity.report._stream import stdout_console as console

    return console()


def _debug() -> bool:
    return os.environ.get("TENSORPARITY_DEBUG", "") not in ("", "0")


def _library_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` is one of tensorparity's own errors (the library is imported only when
    there is an exception to look at)."""
    if exc is None:
        return False
    from tensorparity.errors import TensorParityError

    return isinstance(exc, TensorParityError)


def _error_json(message: str, fix: str | None, code: int, exc: BaseException | None = None) -> str:
    import json

    doc: dict[str, Any] = {"schema": "tensorparity.error/1", "error": message, "fix": fix, "exit_code": code}
    if _library_error(exc):
        doc.update(error=exc.message, path=exc.path, key=exc.key)  # type: ignore[union-attr]
    return json.dumps(doc, ensure_ascii=False)


def _fail(line: str, *, json_: bool = False, exc: BaseException | None = None, code: int = EXIT_ERROR,
          fix: str | None = None) -> typer.Exit:
    if _debug():
        traceback.print_exc()
    sys.stderr.write(" ".join(line.split()) + "\n")  # exactly one line, whatever the message held
    sys.stderr.flush()
    if json_:
        fix = exc.fix if _library_error(exc) else fix  # type: ignore[union-attr]
        try:
            emit_json(_error_json(" ".join(line.split()), fix, code, exc))
        except (BrokenPipeError, OSError):
            pass
    return typer.Exit(code)


def fail_json(line: str, fix: str | None, code: int) -> None:
    """Print an error document on stdout for ``--json`` (outside a command: click's usage errors)."""
    sys.stdout.write(_error_json(line, fix, code) + "\n")
    sys.stdout.flush()


class _UserStdoutToStderr:
    """``sys.stdout`` (and fd 1, where it is the real stdout) sent to stderr for the block; the
    report stream keeps the original."""

    def __enter__(self) -> None:
        from tensorparity.report._stream import REPORT as _REPORT

        self.saved_stdout, self.saved_fd, self.previous = sys.stdout, None, _REPORT.stream
        try:
            sys.stdout.flush()
            if sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2:
                self.saved_fd = os.dup(1)
                _REPORT.stream = os.fdopen(os.dup(self.saved_fd), "w", encoding="utf-8", errors="replace")
                os.dup2(2, 1)
        except (AttributeError, OSError, ValueError):  # a captured stdout without a descriptor (tests)
            self.saved_fd = None
        if self.saved_fd is None:
            _REPORT.stream = self.saved_stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc: object) -> None:
        from tensorparity.report._stream import REPORT as _REPORT

        sys.stdout = self.saved_stdout
        stream = _REPORT.stream
        _REPORT.stream = self.previous
        if self.saved_fd is not None:
            try:
                stream.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                stream.close()
            except (BrokenPipeError, OSError):
                pass
            os.dup2(self.saved_fd, 1)
            os.close(self.saved_fd)


def command(func: F) -> F:
    """Run a command body with tensorparity's error contract.

    ``TensorParityError`` -> ``error: <message>`` on stderr, exit 2. Any other exception ->
    ``internal error: <type>: <message> (please report; ...)``, exit 2. Ctrl-C -> ``interrupted``,
    exit 130. With ``--json`` every one of them also prints one error document on stdout
    (schema ``tensorparity.error/1``). While the body runs, what user code prints to stdout goes
    to stderr (see :class:`_Report`). typer's own exits and usage errors pass through unchanged.

    Example:
        >>> @command
        ... def add(a: int, b: int) -> int:
        ...     return a + b
        >>> add(1, 2)
        3
    """

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        json_ = bool(kwargs.get("json_"))
        try:
            with _UserStdoutToStderr():
                try:
                    # First, so that a Ctrl-C from here on is noted for any writer (main()'s handler
                    # tells _output only once it is loaded, to keep --help free of the library).
                    import tensorparity._output  # noqa: F401
                    return func(*args, **kwargs)
                except BrokenPipeError:
                    raise
                except KeyboardInterrupt:
                    raise _fail("interrupted", json_=json_, code=EXIT_INTERRUPTED,
                                fix="run the command again; nothing was left half-written") from None
                except (typer.Exit, typer.Abort, typer.TyperException):
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a clean exit
                    if _library_error(exc):
                        raise _fail(f"error: {exc}", json_=json_, exc=exc) from None
                    raise _fail(f"internal error: {type(exc).__name__}: {exc} "
                                "(please report; set TENSORPARITY_DEBUG=1 for the traceback)", json_=json_,
                                fix="please report it; set TENSORPARITY_DEBUG=1 for the traceback") from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python from complaining
            # about the unflushed stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_OK) from None

    return run  # type: ignore[return-value]


def check_output(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], overwrite: bool,
                 **options: Any) -> None:
    """:func:`tensorparity._output.check_output` (refuse an existing path without ``--overwrite``
    and an input even with it), imported when a command runs."""
    from tensorparity._output import check_output as check

    check(out, inputs, overwrite, **options)


def finish(report: Report, *, json_: bool, top: int = TOP, **render_options: Any) -> NoReturn:
    """Print a report (JSON and nothing else, or its rich rendering) and exit with its code.

    ``render_options`` go to the report's ``render`` (``fold=False`` for inspect's ``--all``)."""
    if json_:
        emit_json(report.to_json())
    else:
        report.render(stdout_console(), top=top, **render_options)
    raise typer.Exit(report.exit_code)


def save_found_mapping(report: Any, path: Path | None) -> None:
    """``--save-map``: write the mapping compare or replay found (YAML, atomically), or say on
    stderr why there is none."""
    if path is None:
        return
    from tensorparity._output import write_text

    found = getattr(report, "found_mapping", None)
    if found is None:
        sys.stderr.write(f"--save-map: no mapping was found to save (none was needed, or a mapping was given); "
                         f"{path} not written\n")
        return
    write_text(path, found.to_yaml(), what="the mapping")
