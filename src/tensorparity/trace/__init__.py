"""Layer parity: capture every layer's forward and backward tensors, store them as a trace,
and compare two runs layer by layer (issue #4, in progress)."""

from tensorparity.report.trace import LayerComparison, TraceReport
from tensorparity.trace.align import RecordSource, align_layers, module_renames
from tensorparity.trace.capture import capture
from tensorparity.trace.compare import compare_traces
from tensorparity.trace.format import TraceError
from tensorparity.trace.noise import noise_floor, noise_tolerance, recorded_noise_floor
from tensorparity.trace.records import SCHEMA, TensorStats, TraceRecord, record_key, tensor_stats
from tensorparity.trace.replay import ReplayedLayer, ReplayReport, SkippedLayer, replay
from tensorparity.trace.seed import InputSpec, input_hash, reproducible, seed_everything
from tensorparity.trace.trace import Trace

__all__ = [
    "InputSpec",
    "LayerComparison",
    "RecordSource",
    "ReplayReport",
    "ReplayedLayer",
    "SCHEMA",
    "SkippedLayer",
    "TensorStats",
    "Trace",
    "TraceError",
    "TraceRecord",
    "TraceReport",
    "align_layers",
    "capture",
    "compare_traces",
    "input_hash",
    "module_renames",
    "noise_floor",
    "noise_tolerance",
    "recorded_noise_floor",
    "record_key",
    "replay",
    "reproducible",
    "seed_everything",
    "tensor_stats",
]
