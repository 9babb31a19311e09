"""Dtypes by name (tensorparity._dtypes): the table agrees with torch for every dtype torch has,
and a pickle's ``torch.<dtype>`` global reads as a name that prints and compares as torch's."""

from __future__ import annotations

import pickle

import pytest
import torch

from tensorparity._dtypes import TorchDType, dtype_info, dtype_name, is_dtype_name, to_torch
from tensorparity.checkpoint.safe_pickle import inert_loads

ALL = sorted(name for name, value in vars(torch).items()
             if isinstance(value, torch.dtype) and str(value) == f"torch.{name}")


@pytest.mark.parametrize("name", ALL)
def test_every_torch_dtype_has_its_size_kind_and_eps(name: str) -> None:
    dtype = getattr(torch, name)
    info = dtype_info(name)
    assert info.itemsize == dtype.itemsize
    assert info.is_floating_point == dtype.is_floating_point
    assert info.is_complex == dtype.is_complex
    if dtype.is_floating_point and name != "float4_e2m1fn_x2":
        assert info.eps == torch.finfo(dtype).eps
    assert to_torch(name) is dtype and to_torch(dtype) is dtype and dtype_name(dtype) == name
    assert is_dtype_name(name)


def test_unknown_names_are_not_dtypes() -> None:
    assert not is_dtype_name("Tensor") and not is_dtype_name("float33") and not is_dtype_name("os.system")
    with pytest.raises(ValueError, match="no dtype"):
        to_torch("float33")


def test_a_pickled_dtype_reads_as_a_name_that_equals_torchs() -> None:
    value = inert_loads(pickle.dumps({"dtype": torch.bfloat16}, protocol=2))["dtype"]
    assert isinstance(value, TorchDType)
    assert value == torch.bfloat16 and value != torch.float16 and repr(value) == "torch.bfloat16"
    assert value.itemsize == 2 and value.is_floating_point and to_torch(value) is torch.bfloat16
    with pytest.raises(AttributeError):
        value.name = "float32"


def test_a_pickle_cannot_rewrite_a_dtype_for_later_files() -> None:
    """A BUILD on ``torch.float32`` (state set on the shared object) is refused, and the next pickle
    still reads ``torch.float32`` as float32: one hostile file cannot change how others read."""
    from tensorparity.errors import CorruptCheckpointError

    hostile = b"\x80\x02ctorch\nfloat32\n}X\x04\x00\x00\x00nameX\x07\x00\x00\x00float64sb."
    with pytest.raises(CorruptCheckpointError, match="read-only"):
        inert_loads(hostile)
    value = inert_loads(pickle.dumps(torch.float32, protocol=2))
    assert value == torch.float32 and value.itemsize == 4
