"""What every report shares: the :class:`Report` protocol and the rendering helpers behind rich
terminal output, JSON and self-contained HTML.

Each report type lives beside its job (``DiffReport`` in :mod:`tensorparity.checks`,
``TraceReport`` in :mod:`tensorparity.trace`, ...); this package holds no job and imports none.
"""

from __future__ import annotations
