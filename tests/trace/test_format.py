"""The trace format: round trips, the streaming writer and its bounded queue, dtypes, crash
recognition, every kind of bad folder, schema versions, other processes and ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tensorparity.checkpoint.tracefolder.format import TraceError, file_digest, write_manifest
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.checkpoint.tracefolder.records import SCHEMA
from tensorparity.checkpoint.tracefolder.writer import TraceWriter
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError, UsageError
from tensorparity.examples import reference_model
from tensorparity.trace import capture

X = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(0))


def capture_reference(out: Path | None = None, **kwargs: object) -> Trace:
    model = reference_model()
    with capture(model, out=out, **kwargs) as trace:
        model(X).sum().backward()
    return trace


def assert_same(a: Trace, b: Trace) -> None:
    assert a.records == b.records
    for ra in a.records:
        if ra.stored:
            ta, tb = a.load(ra), b.load(ra)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), ra.key


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("traces") / "ref"
    capture_reference(folder)
    return folder


def test_streamed_capture_equals_in_memory_and_round_trips(tmp_path: Path, saved: Path) -> None:
    memory = capture_reference()
    opened = Trace.open(saved)
    assert opened.path == saved and opened.mode == "full"
    assert_same(memory, opened)
    again = memory.save(tmp_path / "copy")
    assert_same(memory, again)
    assert again.provenance == memory.provenance
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["schema"] == "tensorparity.trace/1" and manifest["mode"] == "full"
    (shard,) = manifest["shards"]
    assert shard["file"] == "shard-00000.safetensors" and len(shard["xxh3_128_data_first"]) == 32
    assert shard["bytes"] == (saved / shard["file"]).stat().st_size
    assert all(r["shard"] == shard["file"] for r in manifest["records"] if r["stored"])
    with safe_open(str(saved / shard["file"]), "pt") as f:  # plain safetensors: no pickle anywhere
        keys = {k for k in f.keys() if not k.startswith("__pad__/")}  # padding: see test_shards_are_safetensors...
        assert keys == {r["key"] for r in manifest["records"] if r["stored"] and "same_as" not in r}
    # A tensor recorded again unchanged (a container's output is its last child's) is stored once:
    # its later records name the first, and load its bytes.
    aliases = {r["key"]: r["same_as"] for r in manifest["records"] if "same_as" in r}
    assert aliases["layers.0.ffn/0/output"] == "layers.0.ffn.2/0/output"
    assert aliases["<model>/0/model_output"] == "decoder/0/output"
    assert all(torch.equal(opened.load(k), opened.load(v)) for k, v in aliases.items())


def test_dtypes_are_kept_and_non_contiguous_tensors_stored_contiguous(tmp_path: Path) -> None:
    class Casts(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return x.bfloat16(), x.to(torch.float8_e4m3fn), x.t(), x.to(torch.int16)

    model = nn.Sequential(Casts())
    x = torch.randn(3, 5)
    with capture(model, out=tmp_path / "t", grads=False) as trace:
        model(x)
    got = {r.path: r for r in Trace.open(tmp_path / "t").select(module="0", kind="output")}
    assert [got[p].dtype for p in "0123"] == ["bfloat16", "float8_e4m3fn", "float32", "int16"]
    opened = Trace.open(tmp_path / "t")
    assert torch.equal(opened.load(got["0"]), x.bfloat16())
    assert torch.equal(opened.load(got["1"]).float(), x.to(torch.float8_e4m3fn).float())
    transposed = opened.load(got["2"])
    assert transposed.is_contiguous() and torch.equal(transposed, x.t())
    assert trace.get("0/0/output/0").stats.hash == opened.get("0/0/output/0").stats.hash


def test_tiny_queue_and_small_shards_still_give_a_correct_trace(tmp_path: Path) -> None:
    streamed = capture_reference(tmp_path / "t", queue_bytes=1, shard_bytes=4096)
    shards = sorted(p.name for p in (tmp_path / "t").glob("shard-*.safetensors"))
    assert len(shards) > 10 and shards[0] == "shard-00000.safetensors"
    assert_same(capture_reference(), Trace.open(tmp_path / "t"))
    assert len(streamed.records) == len(Trace.open(tmp_path / "t").records)


def test_shards_are_safetensors_files_and_their_checksum_is_the_files(tmp_path: Path) -> None:
    # The writer writes shards itself, data first and the header last into room reserved at the
    # start: what the safetensors library reads (every dtype, empty and 0-d tensors, a tensor
    # that straddles blocks), and checksummed from memory as the bytes go out, in that order.
    tensors = {"b/0/output": torch.arange(5, dtype=torch.int8), "a/0/output": torch.randn(3, 4),
               "c/0/output": torch.randn(7, dtype=torch.float64), "d/0/output": torch.ones(3, dtype=torch.bfloat16),
               "e/0/output": torch.zeros(0), "f/0/output": torch.tensor(True), "g/0/output": torch.randn(3000)}
    writer = TraceWriter(tmp_path / "w", queue_bytes=8192)  # blocks of 4096 bytes: "g" straddles three
    for key, tensor in tensors.items():
        writer.put(key, tensor)
    [shard] = writer.close()
    path = tmp_path / "w" / shard.file
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 4096 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt", "tensorparity": SCHEMA}
    # In the order they arrived, each at a multiple of 64 bytes (what torch allocates: the same
    # BLAS code path when a replay computes on them), the bytes between them padding of their own.
    assert [k for k in header if k != "__metadata__" and not k.startswith("__pad__/")] == list(tensors)
    assert all(header[k]["data_offsets"][0] % 64 == 0 for k in tensors if tensors[k].numel())
    pads = [v for k, v in header.items() if k.startswith("__pad__/")]
    assert pads and all(v["dtype"] == "U8" and 0 < v["shape"][0] < 64 for v in pads)
    read = {k: v for k, v in load_file(str(path)).items() if not k.startswith("__pad__/")}
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], t) for k, t in tensors.items())
    assert shard.bytes == len(raw) and shard.digest == file_digest(path) and shard.tensors == 7
    assert shard.digest == xxhash.xxh3_128(raw[8 + n:] + raw[:8 + n]).hexdigest()


def test_a_tensor_changed_after_put_is_stored_as_it_was(tmp_path: Path) -> None:
    # put copies before it returns: a capture hands over the step's own tensors, which later
    # in-place operations (an in-place ReLU, the optimizer) change.
    writer = TraceWriter(tmp_path / "w", queue_bytes=8192)
    t = torch.arange(5000.0)
    writer.put("t", t)
    t.zero_()
    writer.close()
    assert torch.equal(load_file(str(tmp_path / "w" / "shard-00000.safetensors"))["t"], torch.arange(5000.0))


def test_capture_waits_for_no_fsync_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Atomic by the rename alone: a capture's exit does not wait for the disk's journal.
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    trace = capture_reference(tmp_path / "t")
    assert synced == [] and (tmp_path / "t" / "manifest.json").is_file() and trace.records
    assert not (tmp_path / "t" / ".capturing").exists()
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    write_manifest(tmp_path / "t", manifest, fsync=True)  # durable where asked: the file and its folder
    assert len(synced) >= 2
    assert_same(trace, Trace.open(tmp_path / "t"))


def test_writer_memory_is_bounded_in_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks wait for the disk: held back here (the first write waits for the gate), the
    # producer stops once queue_bytes of blocks are full, and goes on when the disk does.
    gate = threading.Event()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (gate.wait(5), real(fd, data, offset))[1])
    writer = TraceWriter(tmp_path / "w", queue_bytes=3 * 4096, shard_bytes=1 << 20)
    blocked = threading.Event()

    def produce() -> None:
        for i in range(20):
            writer.put(f"t{i}", torch.full((1000,), float(i)))  # 4000 bytes each
        blocked.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert not blocked.wait(0.3)  # the producer waits for the writer
    gate.set()
    thread.join(5)
    assert blocked.is_set()
    writer.close()
    assert writer.peak_bytes <= 3 * 4096
    assert len(writer.shard_of) == 20
    read = load_file(str(tmp_path / "w" / "shard-00000.safetensors"))
    assert all(torch.equal(read[f"t{i}"], torch.full((1000,), float(i))) for i in range(20))


def test_failed_capture_leaves_a_folder_recognised_as_unfinished(tmp_path: Path) -> None:
    model = reference_model()
    with pytest.raises(ValueError, match="stop"):
        with capture(model, out=tmp_path / "t", shard_bytes=1):
            model(X)
            raise ValueError("stop")
    assert not (tmp_path / "t" / "manifest.json").exists()
    with pytest.raises(TraceError, match="the capture did not finish") as err:
        Trace.open(tmp_path / "t")
    assert "fix: capture the trace again" in str(err.value)


def test_killed_process_leaves_shards_without_manifest(tmp_path: Path) -> None:
    script = f"""
import os, torch
from tensorparity.examples import reference_model
from tensorparity.trace import capture
model = reference_model()
with capture(model, out={str(tmp_path / 't')!r}, shard_bytes=1) as trace:
    model(torch.randn(2, 16, 20)).sum().backward()
    import time; time.sleep(0.5)  # the writer flushes some shards
    os._exit(3)  # killed: no cleanup, no manifest
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()
    shards = list((tmp_path / "t").glob("shard-*.safetensors"))
    assert shards
    with pytest.raises(TraceError, match=rf"did not finish: {len(shards)} shard file\(s\) but no manifest.json"):
        Trace.open(tmp_path / "t")


def test_not_a_trace_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not a trace: no manifest.json; fix: pass a folder written by"):
        Trace.open(tmp_path)
    with pytest.raises(TraceError, match="no such trace folder"):
        Trace.open(tmp_path / "absent")


def copy_trace(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_manifest(folder: Path, change: object) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)  # type: ignore[operator]
    (folder / "manifest.json").write_text(json.dumps(data))


def test_truncated_and_corrupt_shards_are_named(tmp_path: Path, saved: Path) -> None:
    cut = copy_trace(saved, tmp_path / "cut")
    shard = cut / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TraceError, match=r"shard-00000.safetensors: shard is \d+ bytes but the manifest says \d+ "
                                         r"\(truncated or changed\); fix: copy the trace folder again"):
        Trace.open(cut)
    flipped = copy_trace(saved, tmp_path / "flipped")
    shard = flipped / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    trace = Trace.open(flipped)  # sizes and headers agree; the checksum is checked on first load
    with pytest.raises(TraceError, match="shard-00000.safetensors: shard checksum .xxh3_128_data_first. does not match"):
        trace.load(trace.records[0])
    with pytest.raises(TraceError, match="fix: copy the trace folder again"):
        trace.verify()
    # A space of the header's padding changed (the header still parses): the checksum covers it too.
    padded = copy_trace(saved, tmp_path / "padded")
    shard = padded / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    end = 8 + int.from_bytes(raw[:8], "little")
    assert raw[end - 1:end] == b" "
    raw[end - 1] = ord("\t")
    shard.write_bytes(bytes(raw))
    with pytest.raises(TraceError, match="shard checksum .xxh3_128_data_first. does not match"):
        Trace.open(padded).verify()
    missing = copy_trace(saved, tmp_path / "missing")
    (missing / "shard-00000.safetensors").unlink()
    with pytest.raises(TraceError, match="shard file is missing"):
        Trace.open(missing)


def test_a_fresh_capture_opens_its_shards_when_first_read(tmp_path: Path) -> None:
    # The capture's own trace does not parse back the headers it has just written; a shard that
    # went missing or was cut after the capture is still named, at the first read of a tensor.
    trace = capture_reference(tmp_path / "fresh")
    assert trace._shards is not None and not trace._shards._handles
    stored = next(r for r in trace.records if r.stored)
    assert torch.equal(trace.load(stored), Trace.open(tmp_path / "fresh").load(stored))
    gone = capture_reference(tmp_path / "gone")
    for shard in (tmp_path / "gone").glob("shard-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(TraceError, match=r"shard-00000.safetensors: shard is \d+ bytes but the manifest says"):
        gone.load(next(r for r in gone.records if r.stored))


def test_a_compare_reads_no_value_from_a_shard_whose_checksum_fails(tmp_path: Path, saved: Path) -> None:
    """Bytes that differ are measured straight from the files (no tensor built), but only after the
    shard's checksum is checked, as a load would: a corrupt trace is an error, never a mismatch."""
    from tensorparity import compare

    flipped = copy_trace(saved, tmp_path / "flipped")
    shard = flipped / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's float32 data: sizes and headers still agree
    shard.write_bytes(bytes(raw))
    assert compare(saved, copy_trace(saved, tmp_path / "copy")).verdict == "identical"
    with pytest.raises(TraceError, match="shard-00000.safetensors: shard checksum .xxh3_128_data_first. does not match"):
        compare(saved, flipped)



def test_schema_versions(tmp_path: Path, saved: Path) -> None:
    newer = copy_trace(saved, tmp_path / "newer")
    edit_manifest(newer, lambda d: d.update(schema="tensorparity.trace/2"))
    with pytest.raises(TraceError, match=r"schema tensorparity.trace/2 is newer than this tensorparity reads "
                                         r"\(tensorparity.trace/1\); fix: upgrade tensorparity"):
        Trace.open(newer)
    older = copy_trace(saved, tmp_path / "older")
    edit_manifest(older, lambda d: d.update(schema="tensorparity.trace/0"))
    with pytest.raises(TraceError, match="is older than .*fix: capture the trace again"):
        Trace.open(older)
    alien = copy_trace(saved, tmp_path / "alien")
    edit_manifest(alien, lambda d: d.update(schema="other/1"))
    with pytest.raises(TraceError, match="not a tensorparity trace manifest"):
        Trace.open(alien)

    def minor(d: dict) -> None:  # what a later 1.x writer may add: tolerated
        d.update(schema="tensorparity.trace/1.4", future={"x": 1})
        for r in d["records"]:
            r["future_field"] = 1
            if r["stats"]:
                r["stats"]["p99"] = 0.5

    later = copy_trace(saved, tmp_path / "later")
    edit_manifest(later, minor)
    assert_same(Trace.open(saved), Trace.open(later))


def test_malformed_manifests(tmp_path: Path, saved: Path) -> None:
    bad_json = copy_trace(saved, tmp_path / "json")
    (bad_json / "manifest.json").write_text('{"schema": "tensorparity.trace/1", ')
    with pytest.raises(TraceError, match="manifest.json is not valid JSON"):
        Trace.open(bad_json)
    forged = copy_trace(saved, tmp_path / "forged")
    edit_manifest(forged, lambda d: d["shards"][0].update(file="../../etc/x.safetensors"))
    with pytest.raises(UnsafeCheckpointError, match="is not shard-NNNNN.safetensors"):
        Trace.open(forged)
    lying = copy_trace(saved, tmp_path / "lying")
    edit_manifest(lying, lambda d: d["records"][1].update(shape=[7, 7]))
    with pytest.raises(TraceError, match=r"\[pre_encode/0/output\]: the shard holds float32\[2, 32, 10\] but the "
                                         r"manifest says float32\[7, 7\]"):
        Trace.open(lying)
    broken = copy_trace(saved, tmp_path / "broken")
    edit_manifest(broken, lambda d: d["records"][3].pop("shape"))
    with pytest.raises(TraceError, match="record 3 is malformed"):
        Trace.open(broken)
    assert issubclass(TraceError, CorruptCheckpointError)


def test_capture_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="folder is not empty.*fix: choose a new folder"):
        capture_reference(tmp_path / "t")
    assert (tmp_path / "t" / "keep.txt").read_text() == "mine"


def test_trace_written_in_another_process_equals_the_in_process_one(tmp_path: Path) -> None:
    script = f"""
import torch
from tensorparity.examples import reference_model
from tensorparity.trace import capture
x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(0))
model = reference_model()
with capture(model, out={str(tmp_path / 'sub')!r}):
    model(x).sum().backward()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    other, here = Trace.open(tmp_path / "sub"), capture_reference()
    assert_same(here, other)
    assert other.provenance["input_hash"] == here.provenance["input_hash"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        with capture(model, out=folder):
            model(torch.full((2, 4), float(rank + 1))).sum().backward()
            for p in model.parameters():  # a real collective on the gradients, after they were recorded
                dist.all_reduce(p.grad)
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_their_own_folders(tmp_path: Path) -> None:
    folder = tmp_path / "ddp"
    mp.spawn(_rank_worker, args=(str(folder), _free_port()), nprocs=2, join=True)
    assert Trace.ranks(folder) == [0, 1]
    assert sorted(p.name for p in folder.iterdir()) == ["rank-0", "rank-1"]
    for rank in (0, 1):
        trace = Trace.open(folder, rank=rank)
        assert trace.path == folder / f"rank-{rank}"
        assert (trace.provenance["rank"], trace.provenance["world_size"]) == (rank, 2)
        assert torch.equal(trace.inputs()[0][0], torch.full((2, 4), float(rank + 1)))
    a, b = Trace.open(folder, rank=0), Trace.open(folder, rank=1)
    assert not torch.equal(a.load("0/0/param_grad/weight"), b.load("0/0/param_grad/weight"))
    with pytest.raises(UsageError, match=r"the trace holds 2 ranks \(0, 1\); fix: pass rank=N"):
        Trace.open(folder)
    with pytest.raises(UsageError, match="has no rank 5"):
        Trace.open(folder, rank=5)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256", "blake2b"])
def test_traces_written_with_older_checksums_still_open_and_verify(tmp_path: Path, algorithm: str) -> None:
    """Older traces name their shards' xxh3-128, sha256 or blake2b of the file; newer ones xxh3-128
    of the data, then the header. All are checked."""
    import hashlib

    model = nn.Linear(3, 2)
    with capture(model, out=tmp_path / "t"):
        model(torch.ones(1, 3)).sum().backward()
    manifest = tmp_path / "t" / "manifest.json"
    data = json.loads(manifest.read_text())
    for shard in data["shards"]:
        del shard["xxh3_128_data_first"]
        raw = (tmp_path / "t" / shard["file"]).read_bytes()
        shard[algorithm] = (xxhash.xxh3_128(raw) if algorithm == "xxh3_128" else hashlib.sha256(raw)
                            if algorithm == "sha256" else hashlib.blake2b(raw, digest_size=32)).hexdigest()
    manifest.write_text(json.dumps(data))
    trace = Trace.open(tmp_path / "t")
    trace.verify()
    assert torch.equal(trace.load("<model>/0/param_grad/weight"), torch.ones(2, 1) @ torch.ones(1, 3))
    data["shards"][0][algorithm] = "0" * len(data["shards"][0][algorithm])
    manifest.write_text(json.dumps(data))
    with pytest.raises(TraceError, match=rf"shard checksum \({algorithm}\) does not match"):
        Trace.open(tmp_path / "t").verify()


def test_every_record_and_statistics_field_survives_the_manifest() -> None:
    # from_dict sets the frozen dataclasses' fields itself (faster than their __init__): a field
    # added later and not read back would be missing here, not silently defaulted.
    import dataclasses

    from tensorparity.checkpoint.tracefolder.records import TraceRecord
    from tensorparity.checkpoint.tracefolder.stats import TensorStats

    stats = TensorStats(numel=6, min=-1.5, max=float("inf"), mean=float("nan"), std=0.25, norm=3.0, nan=1, inf=1,
                        hash="fp2:00ff")
    record = TraceRecord(index=7, module="layers.0", call=2, module_type="torch.nn.Linear", kind="output",
                         path="0.a", shape=(2, 3), dtype="bfloat16", device="cuda:1", stats=stats, stored=False,
                         value=None, is_tensor=True,
                         placement={"mesh": [2], "placements": ["Shard(0)"], "global_shape": [4, 3], "offset": [2, 0]})
    back = TraceRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    for f in dataclasses.fields(TraceRecord):
        if f.name != "stats":
            assert getattr(back, f.name) == getattr(record, f.name), f.name
    for f in dataclasses.fields(TensorStats):
        got, want = getattr(back.stats, f.name), getattr(stats, f.name)
        assert got == want or (got != got and want != want), f.name
    assert back.key == record.key
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.index = 8  # type: ignore[misc]
    value = TraceRecord.from_dict(TraceRecord(index=0, module="", call=0, module_type="m", kind="output", path="1",
                                              shape=(), dtype="", device="", stats=None, stored=False, value=3.5,
                                              is_tensor=False).to_dict())
    assert value.value == 3.5 and value.is_tensor is False and value.stats is None and value.placement is None


def test_a_tensor_changed_in_place_between_records_is_stored_again(tmp_path: Path) -> None:
    class Doubles(nn.Module):  # its output is its child's, doubled in place after the child's hook
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            y.mul_(2)
            return y

    class Passes(nn.Module):  # its output is its child's, unchanged
        def __init__(self) -> None:
            super().__init__()
            self.inner = Doubles()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = Passes()
    x = torch.randn(3, 4)
    with capture(model, out=tmp_path / "t") as trace:
        model(x).sum().backward()
    rows = {r["key"]: r for r in json.loads((tmp_path / "t" / "manifest.json").read_text())["records"]}
    assert "same_as" not in rows["inner/0/output"]  # changed since inner.lin's record: its own bytes
    assert rows["<model>/0/model_output"]["same_as"] == "inner/0/output"  # unchanged since: stored once
    opened = Trace.open(tmp_path / "t")
    with torch.no_grad():
        first = model.inner.lin(x)
    assert torch.equal(opened.load("inner.lin/0/output"), first)
    assert torch.equal(opened.load("inner/0/output"), first * 2)
    assert torch.equal(opened.load("<model>/0/model_output"), first * 2)
    assert opened.get("<model>/0/model_output").stats == opened.get("inner/0/output").stats
    assert torch.equal(trace.load("<model>/0/model_output"), first * 2)


@pytest.mark.parametrize("target, error", [
    ("nowhere/0/output", "not a tensor stored under its own key"),
    ("decoder/0/grad_output", "holds float32"),
])
def test_a_forged_same_as_is_refused_naming_the_record(tmp_path: Path, saved: Path, target: str, error: str) -> None:
    folder = tmp_path / "forged"
    shutil.copytree(saved, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    row = next(r for r in manifest["records"] if r["key"] == "<model>/0/model_output")
    row["same_as"] = target
    if target == "decoder/0/grad_output":
        row["shape"] = [1, 1]  # the record and the tensor it names disagree
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=error) as info:
        Trace.open(folder)
    assert "<model>/0/model_output" in str(info.value) and "capture the trace again" in str(info.value)
