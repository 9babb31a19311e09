"""Shard checksums checked ahead on a background thread while a comparison plans: both sides'
shards in turn, every shard marked checked only where it matched, a failure left for the reader
that needs the shard (the comparison still stops on a corrupt shard), no thread left behind."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tensorparity.checkpoint.tracefolder.ahead import check_ahead
from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.examples import reference_model
from tensorparity.trace import capture, compare_traces

X = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(0))


def trace_to(folder: Path) -> Path:
    torch.manual_seed(0)
    model = reference_model()
    with capture(model, out=folder, shard_bytes=4 << 10):  # several small shards
        model(X).sum().backward()
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trace_to(tmp_path_factory.mktemp("ahead") / "ref")


def no_thread_left() -> bool:
    return not any(t.name == "tensorparity-check-ahead" for t in threading.enumerate())


class Checks:
    """A source whose shards are checked by recording calls (one may fail)."""

    def __init__(self, name: str, n: int, calls: list[str], fail: int = -1, last: threading.Event | None = None):
        self.name, self.n, self.calls, self.fail, self.last = name, n, calls, fail, last

    def pending_checks(self) -> list[tuple[str, Callable[[], None]]]:
        def check(i: int) -> None:
            self.calls.append(f"{self.name}{i}")
            if self.last is not None and i == self.n - 1:
                self.last.set()
            if i == self.fail:
                raise TraceError("shard checksum does not match the manifest", fix="copy it again")

        return [(f"{self.name}-digest{i}", lambda i=i: check(i)) for i in range(self.n)]


def test_both_sides_are_checked_in_turn_and_a_failure_does_not_stop_the_rest() -> None:
    calls: list[str] = []
    done = threading.Event()
    with check_ahead(Checks("a", 3, calls, fail=0, last=done), object(), Checks("b", 1, calls)):
        assert done.wait(60)
    assert calls == ["a0", "b0", "a1", "a2"]
    assert no_thread_left()


def test_a_real_traces_shards_are_checked_and_marked(saved: Path) -> None:
    trace = Trace.open(saved)
    try:
        assert len(trace.pending_checks()) > 1
        done = threading.Event()
        with check_ahead(Checks("x", 1, [], last=done), trace):  # the trace's shards after x0
            assert done.wait(60)
            for _ in range(600):
                if not trace.pending_checks():
                    break
                threading.Event().wait(0.05)
        assert trace.pending_checks() == [] and no_thread_left()
    finally:
        trace.close()


def test_a_corrupt_shard_still_stops_the_comparison(tmp_path: Path, saved: Path) -> None:
    flipped = Path(shutil.copytree(saved, tmp_path / "flipped"))
    shards = sorted(flipped.glob("shard-*.safetensors"))
    raw = bytearray(shards[-1].read_bytes())
    raw[-3] ^= 0xFF
    shards[-1].write_bytes(bytes(raw))
    with pytest.raises(TraceError, match=f"{shards[-1].name}: shard checksum .xxh3_128_data_first. does not match"):
        compare_traces(saved, flipped)
    assert no_thread_left()
    assert compare_traces(saved, saved).verdict == "identical"


def test_shards_the_other_side_holds_too_are_left_alone(tmp_path: Path, saved: Path) -> None:
    # The same run captured twice: every shard's checksum is in both manifests, the bytes compare
    # equal, and nothing is hashed ahead (a background hash would only cost).
    again = trace_to(tmp_path / "again")
    a, b = Trace.open(saved), Trace.open(again)
    try:
        assert {d for d, _ in a.pending_checks()} == {d for d, _ in b.pending_checks()}
        calls: list[str] = []
        done = threading.Event()
        with check_ahead(a, Checks("x", 1, calls, last=done), b):
            assert done.wait(60)
        assert calls == ["x0"] and len(a.pending_checks()) == len(b.pending_checks()) > 1
        report = compare_traces(a, b)
        assert report.verdict == "identical"
        assert len(a.pending_checks()) == len(b.pending_checks()) > 1  # equal bytes: no values read
    finally:
        a.close()
        b.close()
