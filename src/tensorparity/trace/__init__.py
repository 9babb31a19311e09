"""Layer parity: capture every layer's forward and backward tensors, store them as a trace,
and compare two runs layer by layer.

:func:`compare` (also exported as ``tensorparity.compare``) is :func:`compare_traces`: two traces,
trace folders or live models, layer by layer, down to the first layer that diverges.
"""

from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import SCHEMA, TensorStats, TraceRecord, record_key, tensor_stats
from tensorparity.trace._capture import capture
from tensorparity.trace._capture_run import capture_run
from tensorparity.trace._compare import compare_traces
from tensorparity.trace._replay import ReplayedLayer, ReplayReport, SkippedLayer, replay
from tensorparity.trace._trace_report import LayerComparison, TraceReport
from tensorparity.trace.align import RecordSource, align_layers, module_renames
from tensorparity.trace.noise import noise_floor, noise_tolerance, recorded_noise_floor
from tensorparity.trace.seed import InputSpec, input_hash, reproducible, seed_everything

compare = compare_traces  # the verb as the CLI spells it: tensorparity compare A B

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
    "capture_run",
    "compare",
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
