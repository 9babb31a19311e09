"""Where reports are printed: the stdout a command started with.

While a command runs, code the user handed us (factories, recipes, input functions) writes its
stdout to stderr instead (the CLI swaps ``sys.stdout``, and file descriptor 1 where it is the
real stdout, and sets :data:`REPORT.stream`), so that ``--json`` output is one JSON document
whatever a factory prints while it builds. Outside a command this is plain ``sys.stdout``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class _Report:
    stream: Any = None


REPORT = _Report()


def report_stream() -> Any:
    """The stream the report is written to (``sys.stdout`` outside a command)."""
    return REPORT.stream if REPORT.stream is not None else sys.stdout


def emit_json(text: str) -> None:
    """Write one JSON document (and a newline) to the report stream."""
    out = report_stream()
    out.write(text + "\n")
    out.flush()


def stdout_console() -> Console:
    """The console people read: the report stream, no syntax highlighting of numbers inside
    user data."""
    from rich.console import Console

    stream = report_stream()
    return Console(highlight=False, file=stream if stream is not sys.stdout else None)
