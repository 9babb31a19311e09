"""Layer parity: capture every layer's forward and backward tensors, store them as a trace,
and compare two runs layer by layer (issue #4, in progress)."""

from tensorparity.trace.records import SCHEMA, TensorStats, TraceRecord, record_key, tensor_stats

__all__ = ["SCHEMA", "TensorStats", "TraceRecord", "record_key", "tensor_stats"]
