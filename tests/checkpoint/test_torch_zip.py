"""torch.save zip archives, written by torch.save itself."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tensorparity as tp
from tensorparity.errors import UnsafeCheckpointError
from tensorparity.examples import reference_model


def test_state_dict_round_trip_is_exact(tmp_path: Path) -> None:
    model = reference_model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = tp.open(tmp_path / "m.pt")
    assert ckpt.format == "torch-zip"
    assert list(ckpt) == list(model.state_dict())
    for key, value in model.state_dict().items():
        entry = ckpt[key]
        assert isinstance(entry, tp.TensorEntry)
        assert entry.shape == tuple(value.shape) and entry.dtype == value.dtype
        assert entry.nbytes == value.numel() * value.element_size()
        assert torch.equal(entry.load(), value)
    assert ckpt.section_of("layers.0.norm1.weight") == "model"
    assert ckpt.num_parameters() == sum(v.numel() for v in model.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn, torch.uint16])
def test_dtypes_are_kept_as_stored(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.arange(24).reshape(4, 6) % 5).to(dtype)
    torch.save({"t": value}, tmp_path / "d.pt")
    entry = tp.open(tmp_path / "d.pt")["t"]
    assert entry.dtype == dtype
    loaded = entry.load()
    assert loaded.dtype == dtype and torch.equal(loaded.view(torch.uint8), value.view(torch.uint8))


def test_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    objs = {"base": base, "t": base.t(), "row": base[2], "col": base[:, 3], "again": base}
    torch.save(objs, tmp_path / "v.pt")
    ckpt = tp.open(tmp_path / "v.pt")
    for key, value in objs.items():
        assert torch.equal(ckpt[key].load(), value), key
    assert ckpt["t"].shape == (5, 4)


def test_loaded_tensor_is_writable_and_file_unchanged(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    before = (tmp_path / "w.pt").read_bytes()
    t = tp.open(tmp_path / "w.pt")["w"].load()
    t.add_(1)
    assert t.sum().item() == 1000
    assert (tmp_path / "w.pt").read_bytes() == before
    assert tp.open(tmp_path / "w.pt")["w"].load().sum().item() == 0


def test_training_checkpoint_sections_and_values(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
                "args": {"lr": 0.1, "name": "run"}, "np": np.arange(3)}, tmp_path / "t.pt")
    ckpt = tp.open(tmp_path / "t.pt")
    assert ckpt.provenance["epoch"] == 7
    assert ckpt.section_of("model.weight") == "model"
    assert ckpt.section_of("optimizer.state.0.exp_avg") == "optimizer"
    assert ckpt.section_of("args.lr") == "config"
    assert ckpt["args.lr"].value == 0.1
    assert ckpt["optimizer.param_groups.0.betas"].value == (0.9, 0.999)
    assert torch.equal(ckpt["np"].load(), torch.arange(3))
    assert torch.equal(ckpt["optimizer.state.0.exp_avg"].load(), opt.state_dict()["state"][0]["exp_avg"])


def test_parameters_and_requires_grad_are_recorded(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    torch.save({"p": p, "b": torch.ones(2)}, tmp_path / "p.pt")
    ckpt = tp.open(tmp_path / "p.pt")
    assert ckpt["p"].is_parameter and ckpt["p"].requires_grad
    assert not ckpt["b"].is_parameter


def test_open_does_not_read_tensor_bytes(tmp_path: Path) -> None:
    # Overwrite the storage bytes in place after writing: open() succeeds without reading them,
    # and load() returns what is in the file now.
    torch.save({"w": torch.zeros(256)}, tmp_path / "w.pt")
    ckpt = tp.open(tmp_path / "w.pt")
    location = ckpt["w"].location
    offset = int(location.rsplit("@", 1)[1])
    with open(tmp_path / "w.pt", "r+b") as f:
        f.seek(offset)
        f.write(torch.ones(256).numpy().tobytes())
    assert ckpt["w"].load().sum().item() == 256
    ckpt.close()


def test_meta_tensor_has_shape_but_no_data(tmp_path: Path) -> None:
    torch.save({"m": torch.empty(3, 4, device="meta")}, tmp_path / "m.pt")
    entry = tp.open(tmp_path / "m.pt")["m"]
    assert entry.shape == (3, 4) and entry.note and "meta" in entry.note
    assert entry.load().device.type == "meta"


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "s.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        tp.open(tmp_path / "s.pt")
    assert "TorchScript" in str(info.value) and "fix:" in str(info.value) and "s.pt" in str(info.value)


def test_folder_with_one_checkpoint_opens_it(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "only.pth")
    (tmp_path / "README.txt").write_text("not a checkpoint")
    assert tp.open(tmp_path).format == "torch-zip"


def test_live_module_and_mapping() -> None:
    model = reference_model()
    ckpt = tp.open(model)
    assert ckpt.format == "module"
    assert ckpt.provenance["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(ckpt["decoder.weight"].load(), model.decoder.weight)
    assert tp.open({"a": {"b": torch.ones(1)}})["a.b"].shape == (1,)
    assert "a.b" in repr(list(tp.open({"a": {"b": torch.ones(1)}})))
