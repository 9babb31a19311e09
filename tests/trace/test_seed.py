"""Reproducible runs: seeding and restoring every generator and switch, input specs, input hashes."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tensorparity.errors import UsageError
from tensorparity.trace.seed import InputSpec, current_seed, input_hash, reproducible, seed_everything


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_seeds_all_generators_and_restores_them() -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    state = seed_everything(7)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (cublas or ":4096:8")
    assert current_seed() == 7
    first = draws()
    seed_everything(7)
    second = draws()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    state.restore()
    assert current_seed() is None
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.is_deterministic_algorithms_warn_only_enabled() == warn
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == cublas
    # The streams continue exactly where they were before seeding.
    def seed_123() -> None:
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)

    seed_123()
    expected = draws()
    seed_123()
    state2 = seed_everything(1)
    draws()
    state2.restore()
    got = draws()
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_reproducible_restores_after_the_block_and_on_error() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with reproducible(0) as seed:
        assert seed == 0 and current_seed() == 0
        a = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(KeyError):
        with reproducible(0, deterministic=False):
            assert torch.equal(torch.rand(2), a)
            raise KeyError("x")
    assert torch.equal(torch.get_rng_state(), before) and current_seed() is None


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True, "0"])
def test_bad_seeds_are_refused(bad: object) -> None:
    with pytest.raises(UsageError, match="seed must be an integer from 0 to 4294967295.*fix: pass e.g. seed=0"):
        seed_everything(bad)  # type: ignore[arg-type]


def test_input_spec_builds_the_same_input_whatever_the_global_state() -> None:
    spec = InputSpec.parse("2x16x20:float32")
    torch.manual_seed(1)
    a = spec.build()
    torch.manual_seed(2)
    b = spec.build()
    assert torch.equal(a, b) and a.shape == (2, 16, 20) and a.dtype == torch.float32
    assert not torch.equal(a, InputSpec.parse("2x16x20:float32:seed=1").build())
    # A float64 replay sees the very same numbers as the float32 run.
    assert torch.equal(InputSpec.parse("2x16x20:float64").build(), a.double())
    assert str(spec) == "2x16x20:float32:seed=0" and InputSpec.parse(str(spec)) == spec


def test_input_spec_with_lengths_is_a_padded_batch() -> None:
    x, lengths = InputSpec.parse("4x16000:float32:lengths", seed=3).build()
    assert x.shape == (4, 16000) and lengths.dtype == torch.int64 and lengths[0] == 16000
    assert ((lengths >= 8000) & (lengths <= 16000)).all()
    for row, n in zip(x, lengths.tolist()):
        assert (row[n:] == 0).all() and (row[:n] != 0).any()
    features, lens = InputSpec.parse("2x80x100:bfloat16:lengths").build()
    assert features.dtype == torch.bfloat16 and (features[1, :, lens[1]:] == 0).all()


def test_integer_and_bool_inputs() -> None:
    tokens = InputSpec.parse("2x12:int64:high=100").build()
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < 100
    mask = InputSpec.parse("3x5:bool").build()
    assert mask.dtype == torch.bool


@pytest.mark.parametrize(("text", "needle"), [
    ("2xx3", "is not a shape like 2x16x20"),
    ("2x3:float13", "'float13' is neither a dtype nor an option"),
    ("2x3:int64", "needs a value range; fix: add ':high=N'"),
    ("16000:float32:lengths", "needs a batch dimension and a time dimension"),
    ("0x3", "must be one or more positive sizes"),
])
def test_bad_input_specs(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match="fix: ") as err:
        InputSpec.parse(text)
    assert needle in str(err.value)


def test_input_hash_covers_bytes_shapes_dtypes_and_structure() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert input_hash(x) == input_hash(x.clone()) == input_hash(x.t().contiguous().t())
    assert input_hash(x) != input_hash(x.reshape(3, 2))
    assert input_hash(x) != input_hash(x.double())
    y = x.clone()
    y[1, 2] = 5.000001
    assert input_hash(x) != input_hash(y)
    assert input_hash(x, lengths=torch.tensor([3, 2])) != input_hash(x, torch.tensor([3, 2]))
    assert input_hash(x, a=1, b=2) == input_hash(x, b=2, a=1)
    assert input_hash([x, {"k": x}]) != input_hash([x, {"j": x}])


def test_input_hash_is_the_same_in_another_process() -> None:
    code = ("import torch; from tensorparity.trace.seed import InputSpec, input_hash; "
            "x, n = InputSpec.parse('2x1000:float32:lengths:seed=9').build(); print(input_hash(x, n))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    x, n = InputSpec.parse("2x1000:float32:lengths:seed=9").build()
    assert out.stdout.strip() == input_hash(x, n)
