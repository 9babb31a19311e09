"""The jobs over two checkpoints: :func:`diff` (checkpoint against checkpoint) and
:func:`load_check` (checkpoint into a model, both directions), each beside its report type.
(:func:`tensorparity.inspect`, one checkpoint's own summary, lives with
:class:`~tensorparity.checkpoint.Checkpoint`, which prints it in a notebook.)

Each opens its sources as :class:`~tensorparity.checkpoint.Checkpoint` objects, pairs keys
(through a :mod:`~tensorparity.mapping` where given) and compares through the one engine in
:mod:`tensorparity.numerics`; the reports implement :class:`tensorparity.report.Report`.
"""

from __future__ import annotations

from typing import Any

from tensorparity.checks._diff import diff
from tensorparity.checks._diff_report import SCHEMA as DIFF_SCHEMA
from tensorparity.checks._diff_report import DiffReport, MappingInfo, SectionDiff, Side, ValueDifference

__all__ = [
    "DIFF_SCHEMA",
    "DiffReport",
    "LoadCheckReport",
    "MappingInfo",
    "SectionDiff",
    "Side",
    "ValueDifference",
    "diff",
    "load_check",
]


def __getattr__(name: str) -> Any:
    # load_check needs torch (it builds models); a diff of two files does not, so it is not
    # imported with the package.
    if name == "load_check":
        from tensorparity.checks._loadcheck import load_check  # lazy: torch loads only for a load check

        return load_check
    if name == "LoadCheckReport":
        from tensorparity.checks._loadcheck_report import LoadCheckReport  # lazy: as load_check

        return LoadCheckReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
