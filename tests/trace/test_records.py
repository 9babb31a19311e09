"""Statistics and content fingerprints of recorded tensors."""

from __future__ import annotations

import pytest
import torch

from tensorparity.trace.records import fingerprint, same_content, tensor_stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int8, torch.bool, torch.complex64])
@pytest.mark.parametrize("n", [1, 3, 1024, 4099])
def test_equal_tensors_agree_and_any_changed_element_or_swap_disagrees(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 50).to(dtype) if dtype != torch.bool else torch.rand(n, generator=g) > 0.5
    assert fingerprint(t) == fingerprint(t.clone()) and fingerprint(t).startswith("fp2:")
    if n > 1:
        changed = t.clone()
        changed[n // 2] = changed[n // 2] + 1 if dtype != torch.bool else ~changed[n // 2]
        assert fingerprint(changed) != fingerprint(t)
        swapped = t.clone()
        swapped[[0, n - 1]] = t[[n - 1, 0]]
        assert (fingerprint(swapped) != fingerprint(t)) or bool((t[0] == t[n - 1]).all())


def test_a_transposed_or_permuted_weight_and_an_odd_view_are_told_apart() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    assert fingerprint(w) != fingerprint(w.t().contiguous())
    assert fingerprint(w) != fingerprint(w[torch.randperm(64, generator=torch.Generator().manual_seed(1))])
    odd = torch.randn(1001)[1:]  # a storage offset of 4 bytes: no int64 view, the fingerprint still works
    assert fingerprint(odd) == fingerprint(odd.clone())
    assert fingerprint(w) == fingerprint(w.reshape(48, 64))  # the same numbers in the same order


def test_fingerprints_of_other_versions_are_never_compared() -> None:
    assert same_content("fp2:ab", "fp2:ab") is True and same_content("fp2:ab", "fp2:cd") is False
    assert same_content("fp1:ab", "fp2:cd") is None and same_content("", "fp2:cd") is None


def test_statistics_skip_nan_and_inf_and_agree_with_float64() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2)) * 3 + 1
    s = tensor_stats(x)
    ref = x.double()
    assert s.mean == pytest.approx(float(ref.mean()), rel=1e-5)
    assert s.std == pytest.approx(float(ref.std(unbiased=False)), rel=1e-5)
    assert s.norm == pytest.approx(float(ref.norm()), rel=1e-6)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    s = tensor_stats(x)
    assert (s.nan, s.inf) == (1, 2) and s.min == pytest.approx(float(x[3:].min()))
