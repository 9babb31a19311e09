"""tensorparity.open(trace_dir): a trace is a checkpoint like any other, keyed by record key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tensorparity
from tensorparity.checkpoint import detect_format
from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tree import TensorEntry, ValueEntry
from tensorparity.errors import UnknownFormatError
from tensorparity.examples import reference_model
from tensorparity.trace import capture


def capture_to(folder: Path, **kwargs: object) -> Trace:
    model = reference_model()
    with capture(model, out=folder, **kwargs) as trace:
        model(torch.randn(2, 16, 20)).sum().backward()
    return trace


def test_open_lists_the_stored_tensors_by_record_key(tmp_path: Path) -> None:
    trace = capture_to(tmp_path / "t")
    assert detect_format(tmp_path / "t") == "trace"
    with tensorparity.open(tmp_path / "t") as ckpt:
        assert ckpt.format == "trace"
        # the run's records in execution order, then the parameters under their state_dict keys
        runs = [r.key for r in trace.records if r.kind != "param"]
        assert list(ckpt) == runs + [f"param.{k}" for k in trace.parameters()]
        entry = ckpt["layers.0.ffn/0/output"]
        assert isinstance(entry, TensorEntry) and entry.shape == (2, 10, 32) and entry.dtype == torch.float32
        assert torch.equal(entry.load(), trace.load("layers.0.ffn/0/output"))
        assert ckpt.provenance["model_class"] == "tensorparity.examples.reference.ReferenceModel"
        assert ckpt.provenance["records"] == len(trace.records)


def test_stats_only_records_are_counted_in_a_note_and_values_are_values(tmp_path: Path) -> None:
    class Sizes(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            return x * 2, x.shape[0]

    model = nn.Sequential(Sizes())
    with capture(model, out=tmp_path / "t", mode="stats", grads=False) as trace:
        model(torch.ones(3))
    ckpt = tensorparity.open(tmp_path / "t")
    assert list(ckpt) == ["<model>/0/model_input/0", "0/0/output/1", "<model>/0/model_output/1"]
    assert isinstance(ckpt["0/0/output/1"], ValueEntry) and ckpt["0/0/output/1"].value == 3
    stats_only = sum(r.is_tensor and not r.stored for r in trace.records)
    assert ckpt.notes == [f"{stats_only} records hold statistics only (mode stats) and are not listed; "
                          "read them with tensorparity.trace.Trace.open"]


def test_a_crashed_capture_is_not_read_as_a_checkpoint(tmp_path: Path) -> None:
    model = reference_model()
    with pytest.raises(RuntimeError):
        with capture(model, out=tmp_path / "t", shard_bytes=1):
            model(torch.randn(2, 16, 20))
            raise RuntimeError("crash")
    # One shard file alone would otherwise open as a plain safetensors checkpoint.
    with pytest.raises(TraceError, match="the capture did not finish"):
        tensorparity.open(tmp_path / "t")
    empty = tmp_path / "empty"
    with pytest.raises(RuntimeError):
        with capture(model, out=empty):  # dies before any shard is written
            raise RuntimeError("crash")
    with pytest.raises(TraceError, match="did not finish: 0 shard file"):
        tensorparity.open(empty)


def test_a_plain_folder_with_a_manifest_json_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "my dataset"}')
    with pytest.raises(UnknownFormatError):
        tensorparity.open(tmp_path)


def test_multi_rank_trace_lists_every_rank(tmp_path: Path) -> None:
    for rank in (0, 1):
        model = nn.Linear(2, 2)
        with capture(model, out=tmp_path / "t" / f"rank-{rank}", rank=rank):
            model(torch.ones(1, 2) * rank)
    assert detect_format(tmp_path / "t") == "trace"
    ckpt = tensorparity.open(tmp_path / "t")
    assert list(ckpt) == [f"rank-{r}/{k}" for r in (0, 1) for k in ("<model>/0/model_input/0",
                                                                    "<model>/0/model_output", "param.weight",
                                                                    "param.bias")]
    assert ckpt.provenance["ranks"] == [0, 1]
    assert torch.equal(ckpt["rank-1/<model>/0/model_input/0"].load(), torch.ones(1, 2))
