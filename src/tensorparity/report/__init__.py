"""Reports for people and machines: rich terminal output, JSON and self-contained HTML.

``inspect`` and ``diff`` themselves are exported from :mod:`tensorparity`; this package exposes
their record types.
"""

from __future__ import annotations

from tensorparity.report.diff import SCHEMA as DIFF_SCHEMA
from tensorparity.report.diff import DiffReport, MappingInfo, SectionDiff, Side, ValueDifference
from tensorparity.report.inspect import SCHEMA as INSPECT_SCHEMA
from tensorparity.report.inspect import DtypeSummary, InspectReport, KeyInfo, NotExecuted, SectionSummary, render_html

__all__ = [
    "DIFF_SCHEMA",
    "INSPECT_SCHEMA",
    "DiffReport",
    "DtypeSummary",
    "InspectReport",
    "KeyInfo",
    "MappingInfo",
    "NotExecuted",
    "SectionDiff",
    "Side",
    "ValueDifference",
    "render_html",
]
