"""Pure tensor comparison: tolerances, metrics, result records, and the streaming engine.

No I/O here: inputs are tensors or lazy entries with ``load()``; every feature (diff, trace
compare, load checks, resume checks, migration round trips) compares through this package.
"""

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
