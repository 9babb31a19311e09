"""Reports for people and machines: rich terminal output, JSON and self-contained HTML.

``inspect`` itself is exported from :mod:`tensorparity`; this package exposes its record types.
"""

from __future__ import annotations

from tensorparity.report.inspect import (
    SCHEMA as INSPECT_SCHEMA,
)
from tensorparity.report.inspect import (
    DtypeSummary,
    InspectReport,
    KeyInfo,
    NotExecuted,
    SectionSummary,
    render_html,
)

__all__ = ["INSPECT_SCHEMA", "DtypeSummary", "InspectReport", "KeyInfo", "NotExecuted",
           "SectionSummary", "render_html"]
