"""Pure tensor comparison: tolerances, metrics, result records, and the streaming engine.

No I/O here: inputs are tensors or lazy entries with ``load()``; every feature (diff, trace
compare, load checks, resume checks, migration round trips) compares through this package.

The package is also callable: ``tensorparity.compare(a, b, mapping=..., tolerance=...)`` is
:func:`tensorparity.trace.compare.compare_traces` (two traces, trace folders or live models,
layer by layer), so that the verb reads as the issue tracker and the CLI spell it.

Example:
    >>> import torch, tensorparity
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> tensorparity.compare(m, m, inputs=torch.ones(1, 2)).verdict
    'identical'
"""

import sys
import types
from typing import Any

from tensorparity.compare.engine import Pair, compare_pairs
from tensorparity.compare.metrics import compare_tensors, same_bytes
from tensorparity.compare.records import Status, TensorComparison
from tensorparity.compare.tolerance import ResolvedTolerance, Tolerance, default_tolerance

__all__ = [
    "Pair",
    "ResolvedTolerance",
    "Status",
    "TensorComparison",
    "Tolerance",
    "compare_pairs",
    "compare_tensors",
    "default_tolerance",
    "same_bytes",
]


class _CallableModule(types.ModuleType):
    """``tensorparity.compare(a, b, ...)`` -> ``compare_traces(a, b, ...)``; the package stays a package."""

    def __call__(self, a: Any, b: Any, /, **options: Any) -> Any:
        from tensorparity.trace.compare import compare_traces  # the trace package builds on this one

        return compare_traces(a, b, **options)


sys.modules[__name__].__class__ = _CallableModule
