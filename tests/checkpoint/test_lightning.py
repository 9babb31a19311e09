"""Lightning .ckpt written by a real lightning.Trainer run."""

from pathlib import Path

import pytest
import torch

import tensorparity as tp

pytest.importorskip("lightning")

from tensorparity.examples.lightning_run import train_lightning  # noqa: E402


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_lightning(tmp_path_factory.mktemp("lightning") / "run.ckpt", steps=2, lr=0.01)


def test_lightning_sections_and_provenance(ckpt_path: Path) -> None:
    ckpt = tp.open(ckpt_path)
    assert ckpt.format == "lightning"
    assert ckpt.provenance["framework"] == "lightning"
    assert ckpt.provenance["global_step"] == 2
    sections = {ckpt.section_of(k) for k in ckpt}
    assert {"model", "optimizer", "schedulers", "loops", "hyper_parameters", "meta"} <= sections
    assert ckpt.section_of("state_dict.model.decoder.weight") == "model"
    assert ckpt.section_of("optimizer_states.0.state.0.exp_avg") == "optimizer"
    # AttributeDict hyper-parameters become plain values, nothing is left unexecuted
    assert ckpt["hyper_parameters.lr"].value == 0.01
    assert ckpt.placeholders == []


def test_lightning_weights_match_torch_load(ckpt_path: Path) -> None:
    # Our own file, written by this test: a trusted torch.load is the oracle.
    reference = torch.load(ckpt_path, weights_only=False)
    ckpt = tp.open(ckpt_path)
    for key, value in reference["state_dict"].items():
        assert torch.equal(ckpt[f"state_dict.{key}"].load(), value), key
    exp_avg = reference["optimizer_states"][0]["state"][0]["exp_avg"]
    assert torch.equal(ckpt["optimizer_states.0.state.0.exp_avg"].load(), exp_avg)
    assert ckpt.num_parameters("model") == sum(v.numel() for v in reference["state_dict"].values())
