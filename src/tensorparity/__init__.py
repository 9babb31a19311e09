"""tensorparity: prove that two PyTorch checkpoints, implementations or runs are numerically the
same, and when they are not, say exactly where and why they part.

The public API is this module's ``__all__``. Names load on first use (PEP 562), so that
``import tensorparity`` and ``tensorparity --help`` cost no torch import; ``from tensorparity import
diff`` and ``tensorparity.diff(...)`` work as if everything were imported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tensorparity._version import __version__

# public name -> the module that defines it
_HOMES: dict[str, str] = {
    "Checkpoint": "tensorparity.checkpoint",
    "ConvertReport": "tensorparity.migrate",
    "DiffReport": "tensorparity.checks",
    "InspectReport": "tensorparity.checkpoint",
    "InternalError": "tensorparity.errors",
    "LoadCheckReport": "tensorparity.checks",
    "MigrateReport": "tensorparity.migrate",
    "Recipe": "tensorparity.resume",
    "ResumeReport": "tensorparity.resume",
    "TensorEntry": "tensorparity.checkpoint",
    "TensorParityError": "tensorparity.errors",
    "Tolerance": "tensorparity.numerics",
    "TraceReport": "tensorparity.trace",
    "ValueEntry": "tensorparity.checkpoint",
    "capture": "tensorparity.trace",
    "compare": "tensorparity.trace",
    "compare_traces": "tensorparity.trace",
    "convert": "tensorparity.migrate",
    "convert_dataloader_state": "tensorparity.dataloader",
    "diff": "tensorparity.checks",
    "inspect": "tensorparity.checkpoint",
    "load_check": "tensorparity.checks",
    "open": "tensorparity.checkpoint",
    "replay": "tensorparity.trace",
    "resume_check": "tensorparity.resume",
}

__all__ = sorted([*_HOMES, "__version__"])


_SUBPACKAGES = frozenset({"checkpoint", "checks", "cli", "dataloader", "errors", "examples", "integrations",
                          "mapping", "migrate", "numerics", "report", "resume", "trace"})


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    elif name in _SUBPACKAGES:  # `import tensorparity; tensorparity.trace.Trace` works as with an eager import
        value = importlib.import_module(f"tensorparity.{name}")
    else:
        raise AttributeError(f"module 'tensorparity' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from tensorparity.checkpoint import Checkpoint, InspectReport, TensorEntry, ValueEntry, inspect, open
    from tensorparity.checks import DiffReport, LoadCheckReport, diff, load_check
    from tensorparity.dataloader import convert_dataloader_state
    from tensorparity.errors import InternalError, TensorParityError
    from tensorparity.migrate import ConvertReport, MigrateReport, convert
    from tensorparity.numerics import Tolerance
    from tensorparity.resume import Recipe, ResumeReport, resume_check
    from tensorparity.trace import TraceReport, capture, compare, compare_traces, replay
