"""tensorparity.inspect: numbers, folding, filtering, JSON, HTML, placeholders, and that no tensor
data is ever read. Fixtures are written by torch.save and safetensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tensorparity
from tensorparity.checkpoint import Checkpoint, TensorEntry, ValueEntry
from tensorparity.checkpoint._inspect import SCHEMA, _key_tree, inspect
from tensorparity.errors import UsageError


@dataclasses.dataclass
class TrainConfig:
    """Pickled by reference: the inert unpickler never imports it, so it becomes a placeholder."""

    lr: float = 0.5
    name: str = "run-7"


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class Net(nn.Module):
    def __init__(self, n_layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.head = nn.Linear(8, 4)


def lightning_shaped(model: nn.Module) -> dict:
    """What Lightning's Trainer.save_checkpoint writes, for a model trained one Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 3}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25)}},
        "hyper_parameters": {"lr": 1e-3, "layers": 12, "clip": float("inf")},
    }


@pytest.fixture
def lightning_ckpt(tmp_path: Path) -> tuple[Path, Net]:
    torch.manual_seed(0)
    model = Net()
    path = tmp_path / "tiny.ckpt"
    torch.save(lightning_shaped(model), path)
    return path, model


def test_sections_bytes_and_provenance_of_a_lightning_checkpoint(lightning_ckpt: tuple[Path, Net]) -> None:
    path, model = lightning_ckpt
    report = inspect(path)
    n_model = sum(t.numel() for t in model.state_dict().values())
    # Adam keeps exp_avg and exp_avg_sq (one element each per parameter) and a scalar step per parameter.
    n_params = list(model.parameters())
    n_optim = 2 * sum(p.numel() for p in n_params) + len(n_params)
    sections = {s.name: s for s in report.sections}
    assert report.format == "lightning"
    assert report.provenance["epoch"] == 3 and report.provenance["global_step"] == 120
    assert report.provenance["framework_version"] == "2.4.0"
    assert sections["model"].elements == n_model
    # A state dict of Linear, Embedding and LayerNorm: nothing tells a buffer from a parameter.
    assert sections["model"].parameters is None and sections["model"].buffers is None
    assert report.counted_by is None and any("counts are tensor elements" in n for n in report.notes)
    assert sections["model"].tensors == len(model.state_dict())
    assert sections["model"].bytes == 4 * n_model
    assert sections["optimizer"].elements == n_optim and sections["optimizer"].parameters is None
    assert sections["callbacks"].tensors == 1
    assert sections["hyper_parameters"].values == 3 and sections["hyper_parameters"].tensors == 0
    assert report.totals.elements == n_model + n_optim + 1
    assert report.totals.bytes == 4 * report.totals.elements
    assert report.totals.tensors == sum(s.tensors for s in report.sections)
    assert [d.dtype for d in report.dtypes] == ["float32"]
    assert report.dtypes[0].elements == report.totals.elements


def test_dtype_counts_and_largest_tensors_in_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"small": torch.zeros(3), "big": torch.zeros(64, 64, dtype=torch.bfloat16),
               "mid": torch.zeros(10, 10), "half": torch.zeros(4, dtype=torch.float16)},
              str(path), metadata={"format": "pt"})
    report = inspect(path, top=3)
    assert [t.key for t in report.largest] == ["big", "mid", "small"]
    assert [t.bytes for t in report.largest] == [64 * 64 * 2, 400, 12]
    dtypes = {d.dtype: (d.tensors, d.elements, d.bytes) for d in report.dtypes}
    assert dtypes == {"bfloat16": (1, 4096, 8192), "float32": (2, 103, 412), "float16": (1, 4, 8)}
    assert report.dtypes[0].dtype == "bfloat16"  # largest first
    assert report.provenance["framework"] == "pt"
    assert inspect(path, top=0).largest == ()


def test_trainable_parameters_of_a_live_module_with_a_frozen_part() -> None:
    model = Net(n_layers=2)
    model.embed.weight.requires_grad_(False)
    report = inspect(model)
    (section,) = report.sections
    assert section.name == "model"
    assert section.trainable == sum(p.numel() for p in model.parameters()) - 32 * 8
    assert report.to_dict()["sections"][0]["trainable_parameters"] == section.trainable


def test_twelve_identical_layers_fold_into_one_group(lightning_ckpt: tuple[Path, Net]) -> None:
    report = inspect(lightning_ckpt[0], keys=r"^state_dict\.")
    (root,) = _key_tree(report.keys, fold=True)
    assert root.name == "state_dict.model"
    layers = next(n for n in root.children if n.name == "layers")
    (group,) = layers.children
    assert group.name == "{0..11}" and group.group and group.detail.startswith("×12")
    assert [c.name for c in group.children] == ["attn", "norm"]
    assert [c.name for c in group.children[0].children] == ["weight", "bias"]
    assert group.children[0].children[0].detail == "[8, 8] float32"
    text = str(report)
    assert "{0..11}" in text and "×12" in text
    # --all: nothing folded, every layer shown.
    unfolded = next(n for n in _key_tree(report.keys, fold=False)[0].children if n.name == "layers")
    assert [c.name for c in unfolded.children] == [str(i) for i in range(12)]


def test_a_different_layer_splits_the_run(tmp_path: Path) -> None:
    state = {f"layers.{i}.w": torch.zeros(4, 4) for i in range(12)}
    state["layers.5.w"] = torch.zeros(4, 5)
    report = inspect(state)
    (layers,) = _key_tree(report.keys, fold=True)
    assert [n.name for n in layers.children] == ["{0..4}.w", "5.w", "{6..11}.w"]
    assert layers.children[2].detail == "×6 [4, 4] float32"


def test_long_sibling_lists_are_cut_with_a_count() -> None:
    state = {f"p{i}": torch.zeros(i + 1) for i in range(40)}
    folded = _key_tree(inspect(state).keys, fold=True)
    assert len(folded) == 21 and folded[-1].name == "… 20 more"
    assert folded[-1].detail.startswith("20 keys")
    assert len(_key_tree(inspect(state).keys, fold=False)) == 40


def test_keys_filter_lists_matching_keys_and_keeps_totals(lightning_ckpt: tuple[Path, Net]) -> None:
    path, _ = lightning_ckpt
    full = inspect(path)
    report = inspect(path, keys=r"layers\.3\.attn")
    assert [k.key for k in report.keys] == ["state_dict.model.layers.3.attn.weight",
                                            "state_dict.model.layers.3.attn.bias"]
    assert report.keys_filter == r"layers\.3\.attn"
    assert report.totals == full.totals
    assert "Keys matching /layers\\.3\\.attn/ (2 of" in str(report)


def test_invalid_keys_regex_is_a_usage_error_with_a_fix(lightning_ckpt: tuple[Path, Net]) -> None:
    with pytest.raises(UsageError) as info:
        inspect(lightning_ckpt[0], keys="layers.(0")
    assert "not a valid regular expression" in str(info.value)
    assert "escape special characters with a backslash" in info.value.fix
    with pytest.raises(UsageError, match="non-negative") as info:
        inspect(lightning_ckpt[0], top=-1)
    assert info.value.fix == "pass 0 or more, e.g. top=10"


def test_json_has_the_schema_and_is_strict(lightning_ckpt: tuple[Path, Net]) -> None:
    report = inspect(lightning_ckpt[0], top=2)
    data = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert data["schema"] == SCHEMA == "tensorparity.inspect/1"
    assert data["format"] == "lightning"
    assert data["totals"]["elements"] == report.totals.elements and "parameters" not in data["totals"]
    assert len(data["largest"]) == 2 and data["largest"][0]["bytes"] >= data["largest"][1]["bytes"]
    assert data["values"]["hyper_parameters.clip"] == "inf"
    keyed = {k["key"]: k for k in data["keys"]}
    assert keyed["state_dict.model.embed.weight"] == {
        "key": "state_dict.model.embed.weight", "section": "model", "kind": "tensor",
        "shape": [32, 8], "dtype": "float32", "bytes": 1024}
    assert keyed["epoch"]["kind"] == "value" and keyed["epoch"]["value"] == "3"


def test_unknown_class_is_a_not_executed_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "with_config.pt"
    torch.save({"model": {"w": torch.ones(2, 2)}, "config": TrainConfig()}, path)
    report = inspect(path)
    (ph,) = report.placeholders
    assert ph.key == "config" and ph.name.endswith("TrainConfig")
    assert ph.state == "{'lr': 0.5, 'name': 'run-7'}"
    text = str(report)
    assert "Not executed (1)" in text and "ran none of it" in text
    assert "TrainConfig() with state {'lr': 0.5, 'name': 'run-7'}" in text
    assert "1 not executed" in repr(report)
    assert json.loads(report.to_json())["placeholders"][0]["key"] == "config"


def test_control_characters_in_keys_are_escaped() -> None:
    report = inspect({"evil\x1b[2Jkey": torch.zeros(1), "v": "line\nbreak\x07"})
    text = str(report)
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b[2Jkey" in text
    assert "\x1b" not in report.to_html()


def raising_checkpoint() -> Checkpoint:
    def refuse() -> torch.Tensor:
        raise AssertionError("inspect read tensor data")

    entries = {f"blocks.{i}.w": TensorEntry(f"blocks.{i}.w", (1024, 1024), torch.float16, 2 << 20, "nowhere", refuse)
               for i in range(4)}
    entries["step"] = ValueEntry("step", 7)
    return Checkpoint(source="<raising>", format="test", entries=entries)


def test_inspect_never_loads_tensor_data() -> None:
    ckpt = raising_checkpoint()
    with pytest.raises(AssertionError):
        ckpt["blocks.0.w"].load()  # the trap works
    report = inspect(ckpt)
    assert report.totals.elements == 4 * 1024 * 1024 and report.totals.bytes == 4 * (2 << 20)
    assert "{0..3}.w" in str(report) and "blocks" in report.to_html() and report.to_json()
    assert "<table" in ckpt._repr_html_()


def test_inspect_of_a_file_touches_no_tensor(lightning_ckpt: tuple[Path, Net], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: TensorEntry) -> torch.Tensor:
        raise AssertionError(f"inspect loaded {self.key}")

    monkeypatch.setattr(TensorEntry, "load", refuse)
    report = inspect(lightning_ckpt[0])
    assert report.totals.tensors > 50 and str(report) and report.to_json()


def test_a_checkpoint_passed_in_stays_open(lightning_ckpt: tuple[Path, Net]) -> None:
    path, model = lightning_ckpt
    with tensorparity.open(path) as ckpt:
        inspect(ckpt)
        loaded = ckpt["state_dict.model.head.weight"].load()
    assert torch.equal(loaded, model.head.weight.detach())


def test_html_of_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"model": {"<b>w": torch.ones(3)}, "config": TrainConfig()}, path)
    with tensorparity.open(path) as ckpt:
        page = ckpt._repr_html_()
    assert "&lt;b&gt;w" in page and "<b>w" not in page
    assert "Not executed (1)" in page and "class='warn'" in page
    assert "<script" not in page


def test_readable_repr() -> None:
    report = inspect({"w": torch.zeros(2, 3)})
    assert repr(report) == "<InspectReport mapping '<in-memory mapping>': 1 tensors, 6 elements, 24 B>"
