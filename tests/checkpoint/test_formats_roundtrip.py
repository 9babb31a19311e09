"""The same weights written in every format read back equal (the demo's first step, checked)."""

from pathlib import Path

import pytest
import torch

import tensorparity as tp
from tensorparity.examples import reference_model
from tensorparity.examples.formats import write_formats


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_formats(reference_model(), tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors", "npz", "nemo", "hf-sharded", "dcp"])
def test_every_format_reads_back_the_same_weights(written: dict[str, Path], fmt: str) -> None:
    state = reference_model().state_dict()
    ckpt = tp.open(written[fmt])
    tensors = {e.key: e for e in ckpt.tensors()}
    # DCP nests the state under "model."; other formats keep the keys as written.
    prefix = "model." if fmt == "dcp" else ""
    for key, value in state.items():
        entry = tensors[prefix + key]
        assert entry.shape == tuple(value.shape), key
        assert torch.equal(entry.load(), value), key
    ckpt.close()
