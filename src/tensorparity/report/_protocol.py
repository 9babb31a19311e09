"""The :class:`Report` protocol, and the implementations every report binds instead of repeating.

A report is the frozen record a job returns (``DiffReport``, ``TraceReport``, ...). Each one
writes what is its own (``to_dict``, ``exit_code``, ``renderable``) and binds the rest to the
plain functions here, one line each: delegation, not a base class (house style 6)::

    @dataclass(frozen=True)
    class ExampleReport:
        def to_dict(self) -> dict[str, Any]: ...
        @property
        def exit_code(self) -> int: ...
        def renderable(self, *, top: int = 10) -> RenderableType: ...

        to_json = report_json
        render = render_report
        __rich_console__ = rich_console
        _repr_html_ = report_html
        __str__ = report_text

A report whose plain text has always been narrower, or whose JSON escapes non-ASCII, binds a
``functools.partialmethod`` of the same function (``__str__ = partialmethod(report_text,
width=100)``), so that ``str()`` and ``--json`` print what they always printed.

No rich import at module level: the CLI imports this package when it starts (for the report
stream), and starts without rich.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tensorparity.report._stream import stdout_console

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType
    from rich.measure import Measurement
    from rich.text import Text

__all__ = ["Report", "Unbroken", "render_report", "report_html", "report_json", "report_text", "rich_console"]


@runtime_checkable
class Report(Protocol):
    """What every report is: data for machines, a verdict for the shell, text for people.

    ``render(console, *, top)`` prints it (lists longer than ``top`` folded, where the report has
    lists: ``top`` is accepted and ignored by those that have none); ``renderable`` is what
    ``render``, ``str()`` and a rich console print. ``exit_code`` is the CLI's: 0 the things
    compared are the same (or the work is done), 1 they differ; a purely informational report
    (what a checkpoint holds) is 0.

    Example:
        >>> import torch, tensorparity
        >>> report = tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)})
        >>> isinstance(report, Report), report.exit_code
        (True, 0)
    """

    @property
    def exit_code(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...

    def to_json(self, *, indent: int | None = 2) -> str: ...

    def renderable(self, *, top: int = 10) -> RenderableType: ...

    def render(self, console: Console | None = None, *, top: int = 10) -> None: ...


def report_json(report: Report, *, indent: int | None = 2, ensure_ascii: bool = False) -> str:
    """``report.to_dict()`` as strict JSON (a non-finite float is an error, not ``NaN``): a
    report's ``to_json``.

    Example:
        >>> import torch, tensorparity
        >>> report_json(tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)}), indent=None)[:33]
        '{"schema": "tensorparity.diff/1",'
    """
    return json.dumps(report.to_dict(), indent=indent, allow_nan=False, ensure_ascii=ensure_ascii)


def report_text(report: Report, *, width: int = 120, trailing_newline: bool = True) -> str:
    """``report.renderable()`` as plain text, ``width`` columns wide whatever the terminal (no
    colours, no terminal codes): a report's ``__str__``.

    Example:
        >>> import torch, tensorparity
        >>> report_text(tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)})).splitlines()[4]
        'Common keys: 1 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / Value mismatches: 0 → identical'
    """
    from tensorparity.report._render import plain_text  # lazy: it imports rich (see the module docstring)

    text = plain_text(report.renderable(), width=width)
    return text if trailing_newline else text.rstrip("\n")


def report_html(report: Report) -> str:
    """What a notebook shows: the report's own ``to_html()`` where it has one, else its plain
    text in a ``<pre>`` (escaped): a report's ``_repr_html_``.

    Example:
        >>> import torch, tensorparity
        >>> report_html(tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)}))[:25]
        "<div class='tp-diff'><sty"
    """
    own = getattr(report, "to_html", None)
    if own is not None:
        return str(own())
    return f"<pre>{html.escape(str(report))}</pre>"


def rich_console(report: Report, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
    """``console.print(report)``: its renderable, lists folded at their default: a report's
    ``__rich_console__``."""
    yield report.renderable()


def render_report(report: Report, console: Console | None = None, *, top: int = 10, **options: Any) -> None:
    """Print ``report.renderable(top=top, **options)`` to ``console`` (by default the console
    of the report stream, :func:`~tensorparity.report._stream.stdout_console`): a report's
    ``render``. An :class:`Unbroken` line in it is printed whole, however narrow the terminal.

    Example:
        >>> import io, torch, tensorparity
        >>> from rich.console import Console
        >>> out = io.StringIO()
        >>> render_report(tensorparity.diff({"w": torch.ones(2)}, {"w": torch.ones(2)}),
        ...               Console(file=out, width=30), top=1)
        >>> "Common keys: 1 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0" in out.getvalue()
        True
    """
    from rich.console import Group

    console = console or stdout_console()
    renderable = report.renderable(top=top, **options)
    pieces = _flat(renderable)
    if not any(isinstance(p, Unbroken) for p in pieces):
        console.print(renderable)
        return
    run: list[RenderableType] = []
    for piece in pieces:
        if isinstance(piece, Unbroken):
            if run:
                console.print(Group(*run))
            console.print(piece.text, soft_wrap=True)  # never broken or cut: scripts grep for it
            run = []
        else:
            run.append(piece)
    if run:
        console.print(Group(*run))


class Unbroken:
    """A line scripts grep for (a report's classic summary, ``Common keys: ... → differs``):
    wrapped like any text in ``str(report)`` and in a notebook, printed whole by
    :func:`render_report`, never broken or cut however narrow the terminal.

    Example:
        >>> from rich.text import Text
        >>> Unbroken(Text("Common keys: 1 → identical")).text.plain
        'Common keys: 1 → identical'
    """

    def __init__(self, text: Text) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        yield self.text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.measure import Measurement

        return Measurement.get(console, options, self.text)


def _flat(renderable: Any) -> list[Any]:
    """The renderables of nested groups, in order (a group prints its parts one after another)."""
    from rich.console import Group

    if not isinstance(renderable, Group):
        return [renderable]
    return [piece for part in renderable.renderables for piece in _flat(part)]
