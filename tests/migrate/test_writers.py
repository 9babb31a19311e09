"""write_checkpoint: every format, read back by its own library, one tensor in memory at a time."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
import weakref
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import tensorparity
from tensorparity.checkpoint import Checkpoint, TensorEntry
from tensorparity.checkpoint.write import format_for_path, source_metadata
from tensorparity.errors import UsageError
from tensorparity.mapping import Mapping as KeyMapping
from tensorparity.mapping import Rule, apply_mapping
from tensorparity.migrate import parse_size, write_checkpoint
from tensorparity.numerics import Tolerance


def _same(a: Any, b: Any, where: str = "") -> None:
    """Nested equality: same containers and keys in order, tensors bitwise with dtype and kind."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point and b.element_size() == 1 else b), where
        assert isinstance(a, torch.nn.Parameter) == isinstance(b, torch.nn.Parameter), where
        assert a.requires_grad == b.requires_grad, where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}.{i}")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning")
    from tensorparity.examples.lightning_run import train_lightning

    return train_lightning(tmp_path_factory.mktemp("lightning") / "run.ckpt", steps=2)


def _write(ckpt: Any, dest: Path, **options: Any) -> Path:
    write_checkpoint(tensorparity.open(ckpt), dest, **options)
    return dest


EXACT = Tolerance(exact=True)

MIXED = {
    "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
    "f64": torch.randn(1, dtype=torch.float64), "i64": torch.arange(3), "i8": torch.tensor([-1, 2], dtype=torch.int8),
    "u8": torch.tensor([255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
    "fp8": torch.randn(4).to(torch.float8_e4m3fn), "u16": torch.tensor([7], dtype=torch.uint16),
    "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3), "c64": torch.randn(2, dtype=torch.complex64),
}


def test_safetensors_output_is_byte_for_byte_what_the_library_writes(tmp_path: Path) -> None:
    save_file(MIXED, tmp_path / "library.safetensors", metadata={"format": "pt"})
    ours = _write(MIXED, tmp_path / "ours.safetensors", format="safetensors")
    assert ours.read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for key, value in MIXED.items():
            _same(value, f.get_tensor(key), key)


def test_safetensors_takes_views_shared_storage_and_extra_metadata(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    state = {"t": base.t(), "row": base[1], "slice": base[:, 2:4], "tied": base}
    out = _write(state, tmp_path / "w.safetensors", format="safetensors", metadata={"note": "ü"})
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ü"}
        for key, value in state.items():
            assert torch.equal(f.get_tensor(key), value), key


def test_torch_output_pickles_exactly_as_torch_save(tmp_path: Path) -> None:
    state = {"a": torch.randn(3), "p": torch.nn.Parameter(torch.ones(2)), "n": 3, "fp8": torch.ones(2).to(torch.float8_e5m2)}
    torch.save(state, tmp_path / "ref.pt")
    ours = _write(state, tmp_path / "ours.pt", format="torch")
    ref_zip, our_zip = zipfile.ZipFile(tmp_path / "ref.pt"), zipfile.ZipFile(ours)
    ref_names = [n.split("/", 1)[1] for n in ref_zip.namelist()]
    assert [n.split("/", 1)[1] for n in our_zip.namelist()] == ref_names
    for name in ref_names:
        if name != ".data/serialization_id":  # a random id per file
            assert our_zip.read(f"archive/{name}") == ref_zip.read(f"ref/{name}"), name
    _same(torch.load(ours, weights_only=True), state)


def test_torch_output_keeps_ties_of_the_source_file_and_copies_other_views(tmp_path: Path) -> None:
    embed = torch.randn(6, 4)
    torch.save({"embed.weight": embed, "head.weight": embed, "row": embed[1], "flat": embed.view(24)},
               tmp_path / "tied.pt")
    out = _write(tmp_path / "tied.pt", tmp_path / "copy.pt", format="torch")
    back = torch.load(out, weights_only=True)
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()  # loads tied, as saved
    assert back["flat"].data_ptr() == back["embed.weight"].data_ptr()  # the same bytes, another shape
    assert back["row"].data_ptr() != back["embed.weight"].data_ptr()  # a slice: its own copy
    for key in back:
        assert torch.equal(back[key], {"embed.weight": embed, "head.weight": embed, "row": embed[1],
                                       "flat": embed.view(24)}[key]), key
    storages = [n for n in zipfile.ZipFile(out).namelist() if "/data/" in n and not n.endswith(".json")]
    assert len(storages) == 2  # embed once, the row once


def test_torch_output_keeps_a_lightning_checkpoint_nested(tmp_path: Path, lightning_ckpt: Path) -> None:
    ckpt = tensorparity.open(lightning_ckpt)
    out = tmp_path / "copy.ckpt"
    write_checkpoint(ckpt, out)  # default format: the source's family (torch)
    original = torch.load(lightning_ckpt, weights_only=False)  # our own file: trusted
    back = torch.load(out, weights_only=True)  # plain containers only: loads without trusting code
    assert list(back) == list(original)
    assert isinstance(back["optimizer_states"], list) and 0 in back["optimizer_states"][0]["state"]
    for key in original:
        if key != "hyper_parameters":  # an AttributeDict, written back as the plain dict it holds
            _same(original[key], back[key], key)
    assert dict(original["hyper_parameters"]) == back["hyper_parameters"]
    assert tensorparity.diff(lightning_ckpt, out, tolerance=EXACT, weights_only=False).verdict == "identical"


def test_renamed_keys_land_in_the_container_of_the_key_they_replaced(tmp_path: Path, lightning_ckpt: Path) -> None:
    mapped = apply_mapping(lightning_ckpt, KeyMapping([Rule("state_dict.model.{p*}", "state_dict.net.{p*}")],
                                                      passthrough=True)).checkpoint
    out = tmp_path / "renamed.ckpt"
    write_checkpoint(mapped, out, format="torch")
    back = torch.load(out, weights_only=True)
    assert list(back) == list(torch.load(lightning_ckpt, weights_only=False))  # same sections, same order
    assert back["state_dict"] and all(k.startswith("net.") for k in back["state_dict"])
    # a hand-built checkpoint without a structure borrows its source file's
    flat = Checkpoint(source=str(lightning_ckpt), format="lightning", entries=dict(mapped.items()))
    write_checkpoint(flat, tmp_path / "again.ckpt", format="torch")
    _same(torch.load(tmp_path / "again.ckpt", weights_only=True), back)


def test_keys_dropped_and_added_keep_the_layout_tidy(tmp_path: Path) -> None:
    src = tensorparity.open({"model": {"enc": {"w": torch.ones(1)}, "dec": {"w": torch.zeros(1)}}, "opt": [{"s": torch.ones(1)}],
                             "epoch": 1})
    entries = {k: e for k, e in src.items() if not k.startswith(("opt.", "model.enc."))}
    entries["model.encoder.w"] = src["model.enc.w"]
    entries["loops.fit.step"] = tensorparity.open({"x": 5})["x"]
    out = tmp_path / "t.pt"
    write_checkpoint(Checkpoint(source="mem", format="mapping", entries=entries, structure=src.structure), out)
    assert torch.load(out, weights_only=True) == {"model": {"dec": {"w": torch.zeros(1)}, "encoder": {"w": torch.ones(1)}},
                                                  "epoch": 1, "loops": {"fit": {"step": 5}}}


def test_sharded_safetensors_split_by_size_with_an_index(tmp_path: Path) -> None:
    state = {f"layer.{i}.w": torch.full((250,), float(i)) for i in range(5)}  # 1000 bytes each
    out = _write(state, tmp_path / "sharded", format="safetensors-sharded", max_shard_size="2KB",
                 metadata={"source": "test"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5000, "source": "test"}
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(key), state[key])
    assert tensorparity.diff(state, out, tolerance=EXACT).verdict == "identical"


def test_dcp_output_loads_with_torch_distributed_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(3, 4), "b": torch.randn(4)}, "step": 7, "opt": {"lr": [0.1, 0.2]}}
    out = _write(state, tmp_path / "dcp", format="dcp", metadata={"k": "v"})
    target = {"model": {"w": torch.empty(3, 4), "b": torch.empty(4)}, "step": 0, "opt": {"lr": []}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(out), no_dist=True)
    _same(target, state)
    assert source_metadata(tensorparity.open(out)) == {"k": "v"}


def _nemo(tmp_path: Path, name: str = "m.nemo") -> Path:
    folder = tmp_path / "nemo_src"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(yaml.safe_dump({"target": "nemo.collections.X", "hidden": 8}))
    torch.save({"enc.weight": torch.randn(8, 8), "enc.bias": torch.randn(8)}, folder / "model_weights.ckpt")
    (folder / "0a1b_tokenizer.model").write_bytes(bytes(range(256)) * 3)
    path = tmp_path / name
    with tarfile.open(path, "w:") as tar:  # NeMo's SaveRestoreConnector: a tar of the folder, arcname "."
        tar.add(folder, arcname=".")
    return path


def test_nemo_output_keeps_config_and_artifacts_and_extracts_cleanly(tmp_path: Path) -> None:
    src = _nemo(tmp_path)
    out = tmp_path / "out.nemo"
    write_checkpoint(tensorparity.open(src), out)  # default format: nemo
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["./model_config.yaml", "./model_weights.ckpt", "./0a1b_tokenizer.model"]
        tar.extractall(tmp_path / "extracted", filter="data")
    ex = tmp_path / "extracted"
    assert yaml.safe_load((ex / "model_config.yaml").read_text()) == {"target": "nemo.collections.X", "hidden": 8}
    assert (ex / "0a1b_tokenizer.model").read_bytes() == bytes(range(256)) * 3
    _same(torch.load(ex / "model_weights.ckpt", weights_only=True),
          torch.load(tmp_path / "nemo_src" / "model_weights.ckpt", weights_only=True))
    assert tensorparity.diff(src, out, tolerance=EXACT, weights_only=False).verdict == "identical"


def test_nemo_needs_a_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        _write({"w": torch.ones(1)}, tmp_path / "x.nemo", format="nemo")
    assert "a .nemo needs a model_config.yaml" in str(err.value) and "nemo.model_config" in err.value.fix
    out = _write({"w": torch.ones(1)}, tmp_path / "y.nemo", format="nemo",
                 metadata={"nemo.model_config": "target: a.B\n"})
    assert tensorparity.open(out)["model_config.target"].value == "a.B"


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "safetensors-sharded", "dcp"])
def test_one_tensor_in_memory_at_a_time(tmp_path: Path, fmt: str) -> None:
    alive: set[int] = set()
    most = [0]

    def loader(i: int) -> Any:
        def load() -> torch.Tensor:
            t = torch.full((64,), float(i))
            alive.add(i)
            weakref.finalize(t, alive.discard, i)
            most[0] = max(most[0], len(alive))
            return t
        return load

    entries = {f"w{i}": TensorEntry(f"w{i}", (64,), torch.float32, 256, "made here", loader(i)) for i in range(12)}
    ckpt = Checkpoint(source="generated", format="mapping", entries=entries)
    write_checkpoint(ckpt, tmp_path / "out", format=fmt, **({"max_shard_size": 1000} if "sharded" in fmt else {}))
    assert 1 <= most[0] <= 2, f"{most[0]} tensors were held at once"
    back = tensorparity.open(tmp_path / "out")
    assert all(torch.equal(back[f"w{i}"].load(), torch.full((64,), float(i))) for i in range(12))


class Config:  # pickled as a class instance: opened as a placeholder, never executed
    def __init__(self) -> None:
        self.lr = 0.1


def test_what_a_format_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "cfg": Config(), "more": [Config(), Config()]}, tmp_path / "src.pt")
    with pytest.raises(UsageError) as err:
        write_checkpoint(tensorparity.open(tmp_path / "src.pt"), tmp_path / "out.pt")
    assert "3 object(s) the pickle named were never executed" in str(err.value)
    assert "cfg, more.0, more.1" in str(err.value)
    with pytest.raises(UsageError) as err:
        _write({"w": torch.ones(1), "epoch": 3, "cfg": {"lr": 0.1}}, tmp_path / "out.safetensors", format="safetensors")
    assert "2 non-tensor value(s) cannot go into safetensors: epoch, cfg.lr" in str(err.value)
    assert "--weights-only" in err.value.fix
    with pytest.raises(UsageError, match="meta tensor"):
        _write({"w": torch.empty(2, device="meta")}, tmp_path / "out.pt", format="torch")
    with pytest.raises(UsageError, match="max_shard_size applies to safetensors-sharded"):
        _write({"w": torch.ones(1)}, tmp_path / "out.pt", format="torch", max_shard_size="1MB")
    with pytest.raises(UsageError, match="unknown output format 'onnx'"):
        _write({"w": torch.ones(1)}, tmp_path / "out.onnx", format="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_sizes_and_format_names() -> None:
    assert parse_size("500MB") == 500_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(" 10 kb ") == 10_000
    for bad in ("", "ten", "-1MB", "0", "5PB"):
        with pytest.raises(UsageError, match="500MB"):
            parse_size(bad)
    assert [format_for_path(Path(p)) for p in ("a.pt", "a.pth", "a.bin", "a.ckpt", "a.safetensors", "a.nemo", "dir")] \
        == ["torch", "torch", "torch", "torch", "safetensors", "nemo", None]
    assert format_for_path(Path("dir"), max_shard_size=10) == "safetensors-sharded"


def test_torch_metadata_travels_in_a_record_torch_load_ignores(tmp_path: Path) -> None:
    out = _write({"w": torch.ones(2)}, tmp_path / "w.pt", metadata={"tensorparity.migrations": "[]"})
    assert source_metadata(tensorparity.open(out)) == {"tensorparity.migrations": "[]"}
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(2))
    buffer = io.BytesIO(out.read_bytes())
    assert any(n.endswith(".data/tensorparity_metadata.json") for n in zipfile.ZipFile(buffer).namelist())
