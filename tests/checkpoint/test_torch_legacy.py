"""Legacy torch.save files, written by torch.save(..., _use_new_zipfile_serialization=False)."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorparity as tp
from tensorparity.errors import CorruptCheckpointError, UnknownFormatError


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _pickle_ends(data: bytes, count: int = 5) -> list[int]:
    """Where each of the first ``count`` consecutive pickles ends (read by pickletools, never run)."""
    ends, start = [], 0
    for _ in range(count):
        for op, _, pos in pickletools.genops(data[start:]):
            if op.name == "STOP":
                start += pos + 1
                break
        ends.append(start)
    return ends


def _training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "global_step": 30}


def test_round_trip_dtypes_views_and_nesting(tmp_path: Path) -> None:
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    objs: dict[str, Any] = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(6).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(-3, 9, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "base": base,
        "slice": base[1:3, 2:],
        "col": base[:, 3],
        "t": base.t(),
        "empty": torch.empty(0, 7),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "nested": {"list": [torch.ones(2), {"deep": torch.zeros(1, dtype=torch.int8)}], "n": 5, "s": "text"},
    }
    ckpt = tp.open(_save(objs, tmp_path / "old.pt"))
    assert ckpt.format == "torch-legacy"
    assert ckpt.provenance["torch_legacy_protocol"] == 1001
    flat = {"nested.list.0": objs["nested"]["list"][0], "nested.list.1.deep": objs["nested"]["list"][1]["deep"],
            **{k: v for k, v in objs.items() if isinstance(v, torch.Tensor)}}
    for key, value in flat.items():
        entry = ckpt[key]
        assert isinstance(entry, tp.TensorEntry), key
        assert entry.dtype == value.dtype and entry.shape == tuple(value.shape), key
        assert entry.nbytes == value.numel() * value.element_size(), key
        loaded = entry.load()
        assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
    assert ckpt["nested.n"].value == 5 and ckpt["nested.s"].value == "text"
    # A slice shares its storage with "base" in the file: same storage, its own offset.
    assert ckpt["slice"].location == ckpt["base"].location


def test_training_checkpoint_with_optimizer_state(tmp_path: Path) -> None:
    state = _training_state()
    ckpt = tp.open(_save(state, tmp_path / "train.pt"))
    assert ckpt.provenance["epoch"] == 3
    assert ckpt.section_of("model.0.weight") == "model"
    assert ckpt.section_of("optimizer.state.0.exp_avg_sq") == "optimizer"
    for key, value in state["model"].items():
        assert torch.equal(ckpt[f"model.{key}"].load(), value), key
    for index, per_param in state["optimizer"]["state"].items():
        for name, value in per_param.items():
            assert torch.equal(ckpt[f"optimizer.state.{index}.{name}"].load(), value), (index, name)
    assert ckpt["optimizer.param_groups.0.lr"].value == 0.01


def test_parameters_keep_their_flags(tmp_path: Path) -> None:
    ckpt = tp.open(_save({"p": torch.nn.Parameter(torch.ones(3)), "b": torch.ones(3)}, tmp_path / "p.pt"))
    assert ckpt["p"].is_parameter and ckpt["p"].requires_grad
    assert not ckpt["b"].is_parameter


def test_open_reads_no_tensor_bytes(tmp_path: Path) -> None:
    path = _save({"w": torch.zeros(64), "v": torch.ones(2)}, tmp_path / "w.pt")
    ckpt = tp.open(path)
    start = int(ckpt["w"].location.rsplit("@", 1)[1])
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(torch.full((64,), 2.0).numpy().tobytes())
    assert ckpt["w"].load().sum().item() == 128
    assert torch.equal(ckpt["v"].load(), torch.ones(2))


def test_whole_module_saved_opens_without_running_its_class(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 3)
    ckpt = tp.open(_save(model, tmp_path / "module.pt"))
    assert [p.name for p in ckpt.placeholders] == ["torch.nn.modules.linear.Linear"]
    tensors = {e.key.rsplit(".", 1)[-1]: e for e in ckpt.tensors()}  # found inside the placeholder's state
    assert len(tensors) == 2
    assert torch.equal(tensors["weight"].load(), model.weight.detach())
    assert torch.equal(tensors["bias"].load(), model.bias.detach())


def test_malicious_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    ckpt = tp.open(_save({"w": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt"))
    assert {p.name for p in ckpt.placeholders} & {"posix.system", "os.system"}
    assert ckpt["payload"].not_executed
    assert torch.equal(ckpt["w"].load(), torch.ones(2))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Truncated and malformed files


def _storages(ckpt: tp.Checkpoint) -> dict[str, int]:
    """storage key -> where its bytes start, from the entries' locations."""
    out = {}
    for entry in ckpt.tensors():
        text, _, start = entry.location.rpartition(" @ ")
        out[text.rsplit("storage ", 1)[1]] = int(start)
    return out


@pytest.fixture
def legacy_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = _save({"a": torch.randn(40), "b": torch.arange(10), "c": torch.ones(3, dtype=torch.bfloat16)},
                 tmp_path / "full.pt")
    return path, path.read_bytes()


@pytest.mark.parametrize("where", ["magic", "sys_info", "data pickle", "key list", "count", "data", "last byte"])
def test_truncated_file(tmp_path: Path, legacy_file: tuple[Path, bytes], where: str) -> None:
    path, data = legacy_file
    magic_end, _, info_end, obj_end, keys_end = _pickle_ends(data)
    starts = _storages(tp.open(path))
    last_key = max(starts, key=starts.__getitem__)
    first_key = min(starts, key=starts.__getitem__)
    cut, named = {
        "magic": (8, "[magic number]"),
        "sys_info": (info_end - 10, "[sys_info]"),
        "data pickle": ((info_end + obj_end) // 2, "[data pickle]"),
        "key list": (keys_end - 3, "[storage key list]"),
        "count": (starts[first_key] - 4, f"[storage {first_key}]"),
        "data": (starts[last_key] + 3, f"[storage {last_key}]"),
        "last byte": (len(data) - 1, f"[storage {last_key}]"),
    }[where]
    assert 4 <= cut < len(data) and (cut < magic_end) == (where == "magic")
    short = tmp_path / "short.pt"
    short.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(short)
    text = str(info.value)
    assert str(short) in text and named in text
    assert "fix: the file is truncated or corrupt; copy it again or re-save it with torch.save" in text


def test_storage_count_that_contradicts_the_pickle(tmp_path: Path, legacy_file: tuple[Path, bytes]) -> None:
    path, data = legacy_file
    starts = _storages(tp.open(path))
    key, start = next(iter(starts.items()))
    bad = bytearray(data)
    bad[start - 8:start] = (10**6).to_bytes(8, "little")
    (tmp_path / "bad.pt").write_bytes(bytes(bad))
    with pytest.raises(CorruptCheckpointError) as info:
        tp.open(tmp_path / "bad.pt")
    assert f"[storage {key}]" in str(info.value) and "holds 1000000 elements but the pickle says" in str(info.value)
    assert "fix: the file is truncated or corrupt" in str(info.value)


def test_pickle_that_is_not_torch(tmp_path: Path) -> None:
    # Starts like a legacy file (a pickled 10-byte long) but is not torch's magic number.
    (tmp_path / "int.pkl").write_bytes(pickle.dumps(2**72 + 12345, protocol=2))
    with pytest.raises(UnknownFormatError) as info:
        tp.open(tmp_path / "int.pkl")
    assert "wrong magic number" in str(info.value) and "fix: open a file written by torch.save" in str(info.value)


def test_pre_0_4_tar_format_asks_for_a_resave(tmp_path: Path) -> None:
    # torch < 0.4 wrote a tar of "sys_info", "pickle", "storages" and "tensors" members.
    path = tmp_path / "ancient.pt"
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(UnknownFormatError) as info:
        tp.open(path)
    assert "pre-0.4 tar format" in str(info.value) and "re-save it with a recent torch.save" in str(info.value)
