"""torch.distributed.checkpoint folders, written by torch.distributed.checkpoint.save itself."""

from __future__ import annotations

import datetime
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import StreamTransformExtension
from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
from torch.distributed.checkpoint.state_dict import get_state_dict

import tensorparity as tp
from tensorparity.checkpoint.dcp import read_dcp
from tensorparity.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError


def _save(state_dict: dict[str, Any], folder: Path, writer: FileSystemWriter | None = None) -> None:
    # Without a process group DCP saves from this single process (it warns that it assumes so).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if writer is None:
            dcp.save(state_dict, checkpoint_id=folder)
        else:
            dcp.save(state_dict, storage_writer=writer)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).square().sum().backward()
    optim.step()
    return model, optim


def test_model_optimizer_and_values_round_trip(tmp_path: Path) -> None:
    model, optim = _trained()
    msd, osd = get_state_dict(model, optim)
    _save({"model": msd, "optim": osd, "extra": {"blob": b"\x00raw\xff", "epoch": 3, "name": "run-7"}}, tmp_path)

    ckpt = tp.open(tmp_path)
    assert ckpt.format == "dcp"
    for key, value in msd.items():
        entry = ckpt[f"model.{key}"]
        assert isinstance(entry, tp.TensorEntry)
        assert entry.shape == tuple(value.shape) and entry.dtype == value.dtype
        assert torch.equal(entry.load(), value)
    for param, state in osd["state"].items():
        for name, value in state.items():
            assert torch.equal(ckpt[f"optim.state.{param}.{name}"].load(), value), (param, name)
    assert ckpt["optim.param_groups.0.lr"].value == 0.01
    assert ckpt["optim.param_groups.0.betas"].value == (0.9, 0.999)
    assert ckpt["optim.param_groups.0.params"].value == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert ckpt["extra.blob"].value == b"\x00raw\xff"
    assert ckpt["extra.epoch"].value == 3 and ckpt["extra.name"].value == "run-7"
    assert ckpt.section_of("model.0.weight") == "model"
    assert ckpt.section_of("optim.state.0.weight.exp_avg") == "optimizer"
    assert ckpt.num_parameters("model") == sum(v.numel() for v in msd.values())
    assert ckpt.provenance["files"] == 1 and ckpt.provenance["dcp_version"] == "1.0.0"
    assert ckpt.provenance["planner_data"] == len(ckpt)
    assert not ckpt.placeholders
    assert "__0_0.distcp @ " in ckpt["model.0.weight"].location
    ckpt.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool,
                                   torch.uint8, torch.float8_e4m3fn])
def test_dtypes_are_kept_as_stored(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.arange(12).reshape(3, 4) % 5).to(dtype)
    _save({"t": value, "scalar": torch.tensor(2.5, dtype=torch.bfloat16)}, tmp_path)
    ckpt = read_dcp(tmp_path)
    loaded = ckpt["t"].load()
    assert ckpt["t"].dtype == dtype and loaded.dtype == dtype
    assert torch.equal(loaded.view(torch.uint8), value.view(torch.uint8))
    assert ckpt["scalar"].shape == () and ckpt["scalar"].load().item() == 2.5


def test_opening_reads_no_tensor_data(tmp_path: Path) -> None:
    old = torch.arange(64, dtype=torch.float32) * 1.5
    _save({"w": old}, tmp_path)
    ckpt = tp.open(tmp_path)
    entry = ckpt["w"]
    assert entry.shape == (64,) and entry.nbytes == 256
    # Overwrite the tensor's bytes in place after opening: load() must see the new bytes.
    distcp = tmp_path / "__0_0.distcp"
    raw = distcp.read_bytes()
    at = raw.find(old.numpy().tobytes())
    assert at > 0
    new = -old
    with open(distcp, "r+b") as f:
        f.seek(at)
        f.write(new.numpy().tobytes())
    assert torch.equal(entry.load(), new)


# --- several ranks, for real: gloo on two processes ----------------------------------------------

def _save_on_two_ranks(rank: int, folder: str, store: str) -> None:
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
        state = {
            "model": {
                "rows": distribute_tensor(full, mesh, [Shard(0)]),
                "cols": distribute_tensor(full.T.contiguous().to(torch.bfloat16), mesh, [Shard(1)]),
                "replicated": torch.ones(3),
            },
            "step": 7,
        }
        dcp.save(state, checkpoint_id=folder)
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown (torch: "terminate called without an
    # active exception"): leave without it, the checkpoint written.
    os._exit(0)


def test_tensor_sharded_over_two_ranks_is_assembled(tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import torch.multiprocessing as mp

    folder = tmp_path / "ckpt"
    mp.spawn(_save_on_two_ranks, args=(str(folder), str(tmp_path / "store")), nprocs=2, join=True)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    ckpt = tp.open(folder)
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    rows, cols = ckpt["model.rows"], ckpt["model.cols"]
    assert rows.shape == (6, 4) and rows.location == "2 chunks in __0_0.distcp, __1_0.distcp"
    assert rows.note == "assembled from 2 chunks"
    assert torch.equal(rows.load(), full)
    assert cols.dtype == torch.bfloat16 and torch.equal(cols.load(), full.T.to(torch.bfloat16))
    assert torch.equal(ckpt["model.replicated"].load(), torch.ones(3))
    assert ckpt["step"].value == 7
    assert ckpt.provenance["ranks"] == 2 and ckpt.provenance["files"] == 2 and ckpt.provenance["step"] == 7


# --- bad input ----------------------------------------------------------------------------------

class _TamperingWriter(FileSystemWriter):
    """DCP's own writer, with a hook that edits the metadata just before it is pickled."""

    def __init__(self, path: Path, tamper: Callable[[Any, list[Any]], None]) -> None:
        super().__init__(path)
        self._tamper = tamper

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        self._tamper(metadata, [r for rs in results for r in rs])
        super().finish(metadata, results)


def _storage_of(results: list[Any], fqn: str) -> Any:
    return next(r.storage_data for r in results if r.index.fqn == fqn)


def test_missing_distcp_file(tmp_path: Path) -> None:
    _save({"w": torch.ones(3)}, tmp_path)
    (tmp_path / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and "[w]" in text and "__0_0.distcp named by .metadata is missing" in text
    assert "fix: copy every *.distcp file of the checkpoint" in text


def test_truncated_distcp_file(tmp_path: Path) -> None:
    _save({"a": torch.ones(3), "b": torch.zeros(5)}, tmp_path)
    distcp = tmp_path / "__0_0.distcp"
    os.truncate(distcp, distcp.stat().st_size - 100)
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert "runs past the end of __0_0.distcp" in str(err.value)
    assert "[b]" in str(err.value) and "fix: __0_0.distcp is truncated; copy it again" in str(err.value)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", "sub/__0_0.distcp", ".."])
def test_file_names_leaving_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    def tamper(metadata: Any, results: list[Any]) -> None:
        _storage_of(results, "w").relative_path = name

    _save({"w": torch.ones(3)}, tmp_path, _TamperingWriter(tmp_path, tamper))
    with pytest.raises(UnsafeCheckpointError) as err:
        tp.open(tmp_path)
    assert repr(name) in str(err.value) and "[w]" in str(err.value)
    assert "fix: refusing a path that could leave the checkpoint folder" in str(err.value)


@pytest.mark.parametrize(("case", "problem"), [
    ("gap", "chunks hold 8 elements but the tensor has 16"),
    ("overlap", "chunks overlap and leave gaps"),
    ("outside", "chunk at [0, 0] of size [5, 4] lies outside the tensor of size [4, 4]"),
])
def test_chunks_that_do_not_tile_the_tensor(tmp_path: Path, case: str, problem: str) -> None:
    def tamper(metadata: Any, results: list[Any]) -> None:
        chunks = metadata.state_dict_metadata["w"].chunks
        if case == "gap":
            chunks[0].sizes = torch.Size([2, 4])
        elif case == "overlap":  # two chunks of half the rows each, both at row 0
            chunks[0].sizes = torch.Size([2, 4])
            chunks.append(type(chunks[0])(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 4])))
        else:
            chunks[0].sizes = torch.Size([5, 4])

    _save({"w": torch.ones(4, 4)}, tmp_path, _TamperingWriter(tmp_path, tamper))
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    text = str(err.value)
    assert "[w]" in text and f"the chunks do not tile the tensor of size [4, 4]: {problem}" in text
    assert "fix: the checkpoint is incomplete or corrupt" in text


def test_chunk_that_contradicts_metadata_fails_on_load(tmp_path: Path) -> None:
    def tamper(metadata: Any, results: list[Any]) -> None:  # point "a" at "b"'s bytes
        _storage_of(results, "a").offset = _storage_of(results, "b").offset

    _save({"a": torch.ones(3), "b": torch.zeros(5)}, tmp_path, _TamperingWriter(tmp_path, tamper))
    ckpt = tp.open(tmp_path)
    with pytest.raises(CorruptCheckpointError) as err:
        ckpt["a"].load()
    assert "[a]" in str(err.value) and "holds [5] torch.float32, .metadata says [3] torch.float32" in str(err.value)
    assert "fix: the checkpoint is incomplete or corrupt" in str(err.value)


def test_chunk_larger_than_its_stored_bytes_is_refused_at_open(tmp_path: Path) -> None:
    def tamper(metadata: Any, results: list[Any]) -> None:  # claims a 4 TB tensor
        meta = metadata.state_dict_metadata["w"]
        meta.size = meta.chunks[0].sizes = torch.Size([1 << 20, 1 << 20])

    _save({"w": torch.ones(4)}, tmp_path, _TamperingWriter(tmp_path, tamper))
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert "[w]" in str(err.value) and f"needs {4 << 40} bytes but its item in __0_0.distcp holds" in str(err.value)
    assert "fix: the checkpoint is incomplete or corrupt" in str(err.value)


class _Identity(StreamTransformExtension):
    """A stream transform that changes nothing but is recorded in the metadata."""

    @staticmethod
    def registry_name() -> str:
        return "stream.tensorparity-test"

    @staticmethod
    def from_descriptor(version: str) -> _Identity:
        return _Identity()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return output

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return input


def test_stream_transforms_are_refused(tmp_path: Path) -> None:
    _save({"w": torch.ones(3)}, tmp_path, FileSystemWriter(tmp_path, _extensions=[_Identity()]))
    with pytest.raises(UnknownFormatError) as err:
        tp.open(tmp_path)
    assert "stream.tensorparity-test/1" in str(err.value) and "[w]" in str(err.value)
    assert "fix: re-save without _extensions" in str(err.value)


def test_safetensors_serialization_is_refused(tmp_path: Path) -> None:
    writer = FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS)
    _save({"w": torch.ones(3), "n": 1}, tmp_path, writer)
    with pytest.raises(UnknownFormatError) as err:
        tp.open(tmp_path)
    assert "[w]" in str(err.value) and "not a torch.save stream" in str(err.value)
    assert "fix: re-save it with FileSystemWriter's default serialization_format" in str(err.value)


def test_missing_or_garbage_metadata(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="no .metadata file; fix: the checkpoint is incomplete"):
        read_dcp(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert ".metadata: malformed pickle" in str(err.value) and "fix: the checkpoint is incomplete" in str(err.value)


class _Gadget:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_metadata_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # A hostile .metadata: a pickle that calls os.system when unpickled with pickle.load.
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Gadget(marker)))
    (tmp_path / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert not marker.exists()
    assert "expected a Metadata, found <not executed: " in str(err.value) and "system(" in str(err.value)
    assert "fix: the checkpoint is incomplete or corrupt" in str(err.value)
