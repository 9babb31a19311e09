"""What every command shares: exit codes, the error wrapper, the stdout console.

A command parses its options, calls one public function, renders the result and exits. Errors
the user can fix are one line on stderr, ``error: <what failed>; fix: <what to do>``, never a
traceback; bugs in tensorparity are one ``internal error:`` line unless ``TENSORPARITY_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from tensorparity.errors import TensorParityError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["EXIT_DIFFERS", "EXIT_ERROR", "EXIT_OK", "command", "stdout_console"]

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
