import pytest
import torch

from tensorparity.errors import UsageError
from tensorparity.numerics import Tolerance, default_tolerance


def test_defaults_follow_torch_testing() -> None:
    assert default_tolerance(torch.float32) == (1.3e-6, 1e-5)
    assert default_tolerance(torch.float16) == (1e-3, 1e-5)
    assert default_tolerance(torch.int64) == (0.0, 0.0)
    assert default_tolerance(torch.float32, torch.float64) == (1.3e-6, 1e-5)


def test_overrides_first_match_wins_and_keep_unset_fields() -> None:
    tol = Tolerance(atol=1e-4, rtol=1e-3, overrides=((r"norm", Tolerance(atol=1e-2)), (r".", Tolerance(exact=True))))
    r = tol.for_key("layers.0.norm.weight", torch.float32)
    assert (r.atol, r.rtol, r.exact) == (1e-2, 1e-3, False) and "norm" in r.source
    assert tol.for_key("layers.0.fc.weight", torch.float32).exact


def test_invalid_tolerance_reports_every_problem() -> None:
    with pytest.raises(UsageError) as info:
        Tolerance(atol=-1, statistic="median", overrides=(("(", Tolerance()),))  # type: ignore[arg-type]
    text = str(info.value)
    assert "atol=-1" in text and "median" in text and "'('" in text and "fix:" in text


def test_describe_states_the_tolerance() -> None:
    assert Tolerance().describe().startswith("atol=dtype default")
    assert Tolerance(exact=True).describe() == "exact (bitwise)"
    assert Tolerance().for_key("w", torch.bfloat16).describe() == "atol=1e-05, rtol=0.016"
