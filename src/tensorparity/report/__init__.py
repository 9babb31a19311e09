"""What every report shares: the :class:`Report` protocol and the rendering helpers behind rich
terminal output, JSON and self-contained HTML.

Each report type lives beside its job (``DiffReport`` in :mod:`tensorparity.checks`,
``TraceReport`` in :mod:`tensorparity.trace`, ...); this package holds no job and imports none.

Every report implements :class:`Report`: ``to_dict()``, ``to_json(*, indent=2)``,
``exit_code`` (0 same or done, 1 differs; 0 for a purely informational report),
``renderable(*, top=10)`` and ``render(console=None, *, top=10)``. What is its own is
``to_dict``, ``exit_code`` and ``renderable``; the rest it binds, one line each, to the shared
implementations here (delegation, not a base class)::

    to_json = report_json            # strict JSON of to_dict()
    render = render_report           # renderable(top=top) on a console; classic lines never broken
    __rich_console__ = rich_console  # console.print(report)
    _repr_html_ = report_html        # its to_html() where it has one, else its text in <pre>
    __str__ = report_text            # plain text, 120 columns, no terminal codes

A report's classic summary line (the one scripts grep for) goes into its renderable as
:class:`Unbroken`, so that ``render`` prints it whole at any terminal width. The CLI's
``finish(report, json_=..., top=...)`` prints any report (JSON or rendered) and exits with its
``exit_code``.

Example:
    >>> import torch, tensorparity
    >>> from tensorparity.report import Report
    >>> report = tensorparity.inspect(torch.nn.Linear(2, 2))
    >>> isinstance(report, Report), report.exit_code, report.to_dict()["schema"]
    (True, 0, 'tensorparity.inspect/1')
"""

from __future__ import annotations

from tensorparity.report._protocol import (
    Report,
    Unbroken,
    render_report,
    report_html,
    report_json,
    report_text,
    rich_console,
)

__all__ = ["Report", "Unbroken", "render_report", "report_html", "report_json", "report_text", "rich_console"]
