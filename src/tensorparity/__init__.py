"""tensorparity: prove that two PyTorch checkpoints, implementations or runs are numerically the
same, and when they are not, say exactly where and why they part."""

from __future__ import annotations

from tensorparity import compare  # the package is callable: compare(a, b) compares two traces or models
from tensorparity.checkpoint import Checkpoint, TensorEntry, ValueEntry, open
from tensorparity.diff import diff
from tensorparity.errors import InternalError, TensorParityError
from tensorparity.loadcheck import load_check
from tensorparity.migrate import ConvertReport, MigrateReport, convert, convert_dataloader_state
from tensorparity.report.diff import DiffReport
from tensorparity.report.inspect import InspectReport, inspect
from tensorparity.report.loadcheck import LoadCheckReport
from tensorparity.report.trace import TraceReport
from tensorparity.resume import Recipe, ResumeReport, resume_check
from tensorparity.trace.capture import capture
from tensorparity.trace.compare import compare_traces
from tensorparity.trace.replay import replay

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "ConvertReport",
    "DiffReport",
    "InspectReport",
    "InternalError",
    "LoadCheckReport",
    "MigrateReport",
    "Recipe",
    "ResumeReport",
    "TensorEntry",
    "TensorParityError",
    "TraceReport",
    "ValueEntry",
    "__version__",
    "capture",
    "compare",
    "compare_traces",
    "convert",
    "convert_dataloader_state",
    "diff",
    "inspect",
    "load_check",
    "open",
    "replay",
    "resume_check",
]
