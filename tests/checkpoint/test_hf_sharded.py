"""Sharded Hugging Face folders: shards by safetensors.torch.save_file / torch.save, index as save_pretrained writes it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorparity as tp
from tensorparity.checkpoint.hf_sharded import read_sharded
from tensorparity.errors import CorruptCheckpointError, UnsafeCheckpointError

Saver = Callable[[Path, dict[str, torch.Tensor]], dict[str, str]]


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4).to(torch.bfloat16),
        "layers.0.attn.qkv.weight": torch.randn(12, 4),
        "layers.0.attn.qkv.bias": torch.randn(12).half(),
        "layers.1.mlp.weight": torch.randn(8, 4, dtype=torch.float64),
        "lm_head.weight": torch.randn(10, 4).to(torch.bfloat16),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    keys = list(state)
    return [{k: state[k] for k in keys[:3]}, {k: state[k] for k in keys[3:5]}, {k: state[k] for k in keys[5:]}]


def _write_index(folder: Path, name: str, weight_map: dict[str, str], total_size: int) -> None:
    # Exactly as transformers' save_pretrained writes it.
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    shards = _shards(state)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    _write_index(folder, "model.safetensors.index.json", weight_map,
                 sum(t.numel() * t.element_size() for t in state.values()))
    return weight_map


def _save_bin(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    shards = _shards(state)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    _write_index(folder, "pytorch_model.bin.index.json", weight_map,
                 sum(t.numel() * t.element_size() for t in state.values()))
    return weight_map


@pytest.mark.parametrize(("save", "fmt"), [(_save_safetensors, "hf-sharded-safetensors"), (_save_bin, "hf-sharded-bin")])
def test_shards_round_trip_exactly(tmp_path: Path, save: Saver, fmt: str) -> None:
    state = _state()
    weight_map = save(tmp_path, state)
    ckpt = tp.open(tmp_path)
    assert ckpt.format == fmt
    assert list(ckpt) == sorted(state)  # index order, which save_pretrained sorts
    for key, value in state.items():
        entry = ckpt[key]
        assert isinstance(entry, tp.TensorEntry)
        assert entry.shape == tuple(value.shape) and entry.dtype == value.dtype
        assert entry.nbytes == value.numel() * value.element_size()
        assert weight_map[key] in entry.location
        assert torch.equal(entry.load(), value), key
    assert ckpt["embed.weight"].dtype == torch.bfloat16
    assert ckpt.provenance["shards"] == 3
    assert ckpt.provenance["total_size"] == ckpt.nbytes()
    assert ckpt.provenance["index"] == ("model.safetensors.index.json" if "safetensors" in fmt
                                        else "pytorch_model.bin.index.json")
    assert ckpt.section_of("lm_head.weight") == "model" and ckpt.notes == []
    ckpt.close()


def test_safetensors_index_is_preferred_over_bin(tmp_path: Path) -> None:
    state = _state()
    _save_bin(tmp_path, {k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    _save_safetensors(tmp_path, state)
    ckpt = tp.open(tmp_path)
    assert ckpt.format == "hf-sharded-safetensors"
    assert torch.equal(ckpt["layers.0.attn.qkv.weight"].load(), state["layers.0.attn.qkv.weight"])
    assert ckpt.notes == [("the folder also holds pytorch_model.bin.index.json; "
                           "read the shards of model.safetensors.index.json instead")]


@pytest.mark.parametrize("save", [_save_safetensors, _save_bin])
def test_opening_reads_no_tensor_data(tmp_path: Path, save: Saver) -> None:
    state = _state()
    weight_map = save(tmp_path, state)
    ckpt = read_sharded(tmp_path)
    entry = ckpt["layers.0.attn.qkv.weight"]
    # Overwrite the tensor's bytes in the shard's data section after opening.
    shard = tmp_path / weight_map["layers.0.attn.qkv.weight"]
    old = state["layers.0.attn.qkv.weight"]
    at = shard.read_bytes().find(old.numpy().tobytes())
    assert at > 0
    new = old * 2 + 1
    with open(shard, "r+b") as f:
        f.seek(at)
        f.write(new.numpy().tobytes())
    assert torch.equal(entry.load(), new)


def test_symlinked_shards_as_in_the_hub_cache(tmp_path: Path) -> None:
    # The Hugging Face cache keeps shards as blobs and links them from snapshots/<rev>/.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    state = _state()
    weight_map = _save_safetensors(blobs, state)
    for name in {*weight_map.values(), "model.safetensors.index.json"}:
        (snapshot / name).symlink_to(Path("../..") / "blobs" / name)
    ckpt = tp.open(snapshot)
    assert ckpt.format == "hf-sharded-safetensors"
    assert torch.equal(ckpt["embed.weight"].load(), state["embed.weight"])


def test_tensor_missing_from_the_index_is_kept_with_a_note(tmp_path: Path) -> None:
    state = _state()
    weight_map = _save_safetensors(tmp_path, state)
    del weight_map["mask"]
    _write_index(tmp_path, "model.safetensors.index.json", weight_map, 1)
    ckpt = tp.open(tmp_path)
    assert torch.equal(ckpt["mask"].load(), state["mask"])
    assert ckpt.notes == [("1 tensor(s) in shards are not listed in model.safetensors.index.json and were kept: "
                           "mask (model-00003-of-00003.safetensors)")]


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "index is not valid JSON"),
    ('{"metadata": {"total_size": 1}}', 'index has no "weight_map" object'),
    ('{"weight_map": ["a", "b"]}', 'index has no "weight_map" object'),
    ('{"weight_map": {"a": 3}}', "weight_map maps 1 key(s) to a non-string: a"),
])
def test_malformed_index(tmp_path: Path, text: str, problem: str) -> None:
    _save_safetensors(tmp_path, _state())
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert "model.safetensors.index.json" in str(err.value) and problem in str(err.value)
    assert "fix: the index is corrupt; download it again or re-save the model with save_pretrained" in str(err.value)


@pytest.mark.parametrize("save", [_save_safetensors, _save_bin])
def test_missing_shard_file(tmp_path: Path, save: Saver) -> None:
    weight_map = save(tmp_path, _state())
    missing = weight_map["lm_head.weight"]
    (tmp_path / missing).unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    text = str(err.value)
    assert f"index names 1 missing shard file(s): {missing} (holding layers.1.mlp.weight, lm_head.weight)" in text
    assert f"fix: copy or download every shard of the checkpoint ({missing})" in text


@pytest.mark.parametrize("save", [_save_safetensors, _save_bin])
def test_key_absent_from_its_shard(tmp_path: Path, save: Saver) -> None:
    weight_map = save(tmp_path, _state())
    weight_map["decoder.extra.weight"] = weight_map["lm_head.weight"]
    name = "model.safetensors.index.json" if save is _save_safetensors else "pytorch_model.bin.index.json"
    _write_index(tmp_path, name, weight_map, 1)
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    text = str(err.value)
    shard = weight_map["lm_head.weight"]
    assert "[decoder.extra.weight]" in text
    assert f"1 key(s) listed in the index are absent from their shard: decoder.extra.weight (in {shard})" in text
    assert f"fix: the shard {shard} does not match the index" in text


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd", "C:\\Windows\\x.safetensors",
                                   "sub/../../x.safetensors", "\\\\server\\share\\x.safetensors"])
def test_shard_names_leaving_the_folder_are_refused(tmp_path: Path, shard: str) -> None:
    weight_map = _save_safetensors(tmp_path, _state())
    weight_map["lm_head.weight"] = shard
    _write_index(tmp_path, "model.safetensors.index.json", weight_map, 1)
    with pytest.raises(UnsafeCheckpointError) as err:
        tp.open(tmp_path)
    assert "[lm_head.weight]" in str(err.value) and repr(shard) in str(err.value)
    assert "fix: refusing a path that could leave the folder" in str(err.value)


def test_corrupt_shard_names_the_shard(tmp_path: Path) -> None:
    weight_map = _save_safetensors(tmp_path, _state())
    shard = tmp_path / weight_map["mask"]
    shard.write_bytes(shard.read_bytes()[:20])  # truncated inside the header
    with pytest.raises(CorruptCheckpointError) as err:
        tp.open(tmp_path)
    assert weight_map["mask"] in str(err.value) and "fix: the file is corrupt or truncated" in str(err.value)
