"""Tensor comparison: tolerances, metrics, result records, and the streaming engine.

No file I/O here: inputs are tensors or lazy entries with ``load()``; every feature (diff, trace
compare, load checks, resume checks, migration round trips) compares through this package, and
nowhere else holds a comparison loop. (``tensorparity.compare`` is the layer-by-layer comparison
of two traces or models, :func:`tensorparity.trace.compare_traces`; this package is the tensor
arithmetic under it.)

Example:
    >>> import torch
    >>> from tensorparity.numerics import Tolerance, compare_tensors
    >>> compare_tensors("w", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0001]), Tolerance(atol=1e-3)).status
    'close'
"""

from tensorparity.numerics.engine import Pair, compare_pairs
from tensorparity.numerics.metrics import compare_tensors, same_bytes
from tensorparity.numerics.results import Status, TensorComparison
from tensorparity.numerics.tolerance import ResolvedTolerance, Tolerance, default_tolerance

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
