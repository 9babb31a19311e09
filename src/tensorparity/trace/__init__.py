"""Layer parity: capture every layer's forward and backward tensors, store them as a trace,
and compare two runs layer by layer (issue #4, in progress)."""

from tensorparity.trace.capture import capture
from tensorparity.trace.format import TraceError
from tensorparity.trace.records import SCHEMA, TensorStats, TraceRecord, record_key, tensor_stats
from tensorparity.trace.seed import InputSpec, input_hash, reproducible, seed_everything
from tensorparity.trace.trace import Trace

__all__ = [
    "SCHEMA",
    "InputSpec",
    "TensorStats",
    "Trace",
    "TraceError",
    "TraceRecord",
    "capture",
    "input_hash",
    "record_key",
    "reproducible",
    "seed_everything",
    "tensor_stats",
]
