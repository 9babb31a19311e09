"""The trace writer: tensors copied into reused blocks as they are put, written block by block
(O_DIRECT where the file system takes it), the header last into room reserved for it."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorparity.checkpoint.tracefolder import stats as stats_module
from tensorparity.checkpoint.tracefolder import writer as writer_module
from tensorparity.checkpoint.tracefolder.format import TraceError, file_digest
from tensorparity.checkpoint.tracefolder.stats import tensor_stats
from tensorparity.checkpoint.tracefolder.writer import TraceWriter


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        out.update({k: v for k, v in load_file(str(shard)).items() if not k.startswith("__pad__/")})
    return out


def test_statistics_measured_while_copying_are_tensor_stats_for_every_dtype(tmp_path: Path) -> None:
    # Float32/64 are measured and copied in one read (the C path); NaN sends them to the exact
    # route after that copy; other dtypes are copied apart. Each is stored and measured right.
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3000, generator=g), "f64": torch.randn(40, 50, dtype=torch.float64, generator=g),
               "nan": torch.tensor([1.0, float("nan"), 3.0] * 700), "bf16": torch.randn(999, generator=g).bfloat16(),
               "int": torch.arange(-500, 500), "bool": torch.rand(77, generator=g) > 0.5, "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(2.5), "mask": torch.full((5000,), torch.finfo(torch.float32).min)}
    writer = TraceWriter(tmp_path / "w", queue_bytes=3 * 4096)  # 4 KB blocks: most of these straddle
    measured = {}
    for key, t in tensors.items():
        writer.put(key, t, done=lambda stats, key=key: measured.__setitem__(key, stats))
    writer.close()
    read = read_all(tmp_path / "w")
    for key, t in tensors.items():
        assert read[key].dtype == t.dtype and torch.equal(read[key].nan_to_num(7.0), t.nan_to_num(7.0)), key
        assert measured[key] == tensor_stats(t), key


@pytest.mark.parametrize("accelerated", [True, False])
def test_a_tensor_across_blocks_is_measured_and_copied_in_one_call(tmp_path: Path, accelerated: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A tensor that straddles two or three blocks gets them all at once: one tensor_stats call
    # fills them (the C route copies each row to its block, a row across two blocks in pieces).
    if not accelerated:
        monkeypatch.setattr(stats_module, "_fused", None)
    calls: list[int] = []

    def spy(t: torch.Tensor, **kw: object) -> object:
        into = kw.get("into")
        calls.append(len(into) if isinstance(into, list) else 0)
        return tensor_stats(t, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_module, "tensor_stats", spy)
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": (torch.randn(n, generator=g) * 3).to(dtype)
               for i, (n, dtype) in enumerate([(100, torch.float32), (2500, torch.float32), (1300, torch.float64),
                                               (2049, torch.float32), (333, torch.float64), (2900, torch.float32)])}
    writer = TraceWriter(tmp_path / "w", queue_bytes=3 * 4096)  # 4 KB blocks, three held at most
    measured = {}
    for key, t in tensors.items():
        writer.put(key, t, done=lambda stats, key=key: measured.__setitem__(key, stats))
    writer.close()
    assert max(calls) >= 2  # some tensor's blocks were filled by one call
    read = read_all(tmp_path / "w")
    for key, t in tensors.items():
        assert torch.equal(read[key], t) and measured[key] == tensor_stats(t), key


def test_producers_on_several_threads_and_a_tensor_larger_than_the_queue(tmp_path: Path) -> None:
    # Blocks are handed out in file order whoever asks, so three threads filling at once and one
    # tensor eight times the queue's size all land whole, each under its own key.
    writer = TraceWriter(tmp_path / "w", queue_bytes=2 * 4096, shard_bytes=40_000)
    expected: dict[str, torch.Tensor] = {}

    def produce(i: int) -> None:
        for j in range(30):
            t = torch.full((97 * (j % 5 + 1),), float(i * 100 + j))
            expected[f"t{i}/{j}"] = t
            writer.put(f"t{i}/{j}", t)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    big = torch.arange(16_384, dtype=torch.float32)  # 64 KB, the queue 8 KB
    expected["big"] = big
    writer.put("big", big)
    for thread in threads:
        thread.join(10)
    shards = writer.close()
    assert writer.peak_bytes <= 2 * 4096 and len(shards) > 2
    read = read_all(tmp_path / "w")
    assert read.keys() == expected.keys()
    assert all(torch.equal(read[k], t) for k, t in expected.items())
    assert all(s.digest == file_digest(tmp_path / "w" / s.file) for s in shards)
    assert sum(s.tensors for s in shards) == len(expected)


def test_device_tensors_go_through_their_own_thread_in_order_with_the_rest(tmp_path: Path) -> None:
    # A CUDA tensor is copied on its device and stored by the device thread once the copy is
    # done; driven here with CPU tensors (no GPU on this machine), interleaved with plain puts.
    writer = TraceWriter(tmp_path / "w", queue_bytes=2 * 4096)
    measured = {}
    expected = {}
    for i in range(12):
        t = torch.randn(700 + 50 * i)
        expected[f"t{i}"] = t
        if i % 2:
            writer._put_device(f"t{i}", t, lambda stats, i=i: measured.__setitem__(i, stats))
        else:
            writer.put(f"t{i}", t, done=lambda stats, i=i: measured.__setitem__(i, stats))
    writer.close()
    read = read_all(tmp_path / "w")
    assert all(torch.equal(read[k], t) for k, t in expected.items())
    assert all(measured[i] == tensor_stats(expected[f"t{i}"]) for i in range(12))


def test_the_header_gets_more_room_when_it_runs_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "HEADER_ROOM", 4096)
    writer = TraceWriter(tmp_path / "w")
    keys = [f"model.layers.{i}.self_attn.rotary_emb.with_a_long_name/0/output/ü{i}" for i in range(200)]
    for i, key in enumerate(keys):
        writer.put(key, torch.tensor([float(i)]))
    shards = writer.close()
    assert len(shards) >= 2  # ~100 bytes an entry (and ~60 its padding's): 4 KB holds ~25, the next twice that
    raw = [(tmp_path / "w" / s.file).read_bytes() for s in shards]
    rooms = [8 + int.from_bytes(r[:8], "little") for r in raw]
    assert rooms[0] == 4096 and rooms[1] == 8192
    read = read_all(tmp_path / "w")
    assert [float(read[k]) for k in keys] == [float(i) for i in range(200)]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_a_file_system_without_o_direct_gets_the_same_bytes_through_the_page_cache(tmp_path: Path) -> None:
    import tempfile

    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(20)}
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        digests = []
        for folder, direct in ((tmp_path / "direct", True), (shm / "tmpfs", True), (tmp_path / "buffered", False)):
            writer = TraceWriter(folder, queue_bytes=4 * 4096, direct=direct)
            for key, t in tensors.items():
                writer.put(key, t)
            [shard] = writer.close()
            digests.append((shard.digest, (folder / shard.file).read_bytes()))
            assert all(torch.equal(read_all(folder)[k], t) for k, t in tensors.items())
        assert digests[0] == digests[1] == digests[2]
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)


def test_a_full_disk_is_one_clear_error_and_never_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = TraceWriter(tmp_path / "w", queue_bytes=2 * 4096)
    with pytest.raises(TraceError, match="No space left on device|no space") as info:
        for i in range(50):  # the producer meets the error once the writer has failed
            writer.put(f"t{i}", torch.randn(2000))
        writer.close()
    assert "\n" not in str(info.value) and "capture again" in str(info.value)
    writer.abort()
    assert not (tmp_path / "w" / "manifest.json").exists()


def test_abort_wakes_a_producer_waiting_for_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (gate.wait(5), real(fd, data, offset))[1])
    writer = TraceWriter(tmp_path / "w", queue_bytes=4096)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(10):
                writer.put(f"t{i}", torch.randn(1500))
        except TraceError as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # waiting for a block
    aborter = threading.Thread(target=writer.abort)
    aborter.start()
    gate.set()
    aborter.join(5)
    thread.join(5)
    assert not thread.is_alive() and not aborter.is_alive()
    assert len(errors) == 1 and "aborted" in str(errors[0])


def test_capture_sizes_the_header_room_from_the_model(tmp_path: Path) -> None:
    # Estimated from the hooked modules and parameters: one shard, and not mostly padding.
    from tensorparity.examples import reference_model
    from tensorparity.trace import capture

    model = reference_model()
    for mode in ("full", "stats"):
        with capture(model, out=tmp_path / mode, mode=mode, inputs=True):
            model(torch.randn(2, 16, 12)).sum().backward()
        [shard] = sorted((tmp_path / mode).glob("shard-*.safetensors"))
        raw = shard.read_bytes()
        room = 8 + int.from_bytes(raw[:8], "little")
        used = len(raw[8:room].rstrip(b" "))
        assert used < room <= max(4096, 3 * used), (mode, used, room)


def test_same_as_must_name_a_tensor_stored_under_its_own_key(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t")
    w.put("a", torch.ones(3))
    w.same_as("b", "a")
    with pytest.raises(TraceError, match="the target must be a tensor stored under its own key"):
        w.same_as("c", "b")  # b is itself a record of a's tensor
    with pytest.raises(TraceError, match="the target must be a tensor stored under its own key"):
        w.same_as("d", "d")
    assert w.close() and w.shard_of["b"] == w.shard_of["a"]

    never = TraceWriter(tmp_path / "never")
    never.put("a", torch.ones(3))
    never.same_as("b", "missing")
    with pytest.raises(TraceError, match="b is recorded as the same tensor as missing, which was never stored"):
        never.close()
