"""Mappings found from parameter signatures alone (stats-mode traces keep no parameter tensors):
the same mapping ``suggest_mapping`` finds from the full tensors, on real ports and on each kind of
layout change, and a signature that is small, exact on every route, and cheap to make."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from tensorparity.errors import CorruptCheckpointError, UsageError
from tensorparity.examples import port_model, reference_model
from tensorparity.mapping import (
    Chain,
    Concat,
    ParamSignature,
    Rearrange,
    Split,
    Suggestion,
    Transpose,
    _param_signature,
    apply_mapping,
    param_signature,
    suggest_from_signatures,
    suggest_mapping,
)
from tensorparity.mapping._param_signature import _sums, _sums_by_parts, _weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))
import ports  # noqa: E402

State = dict[str, torch.Tensor]


def signatures(state: State, *, stats: bool = False) -> dict[str, ParamSignature]:
    return {k: param_signature(v, stats=stats) for k, v in state.items()}


def evidence(s: Suggestion) -> list[tuple[Any, ...]]:
    return [(p.a_keys, p.b_keys, p.transform, p.method, p.confidence, p.note) for p in s.pairs]


def reproduces(a: State, b: State, s: Suggestion) -> bool:
    """Applying the mapping to A's state dict gives B's, key for key and bit for bit."""
    made = apply_mapping(a, s.mapping).checkpoint
    return set(made) == set(b) and all(made[k].load().dtype == b[k].dtype and torch.equal(made[k].load(), b[k])
                                       for k in b)


def agree(a: State, b: State) -> Suggestion:
    """The suggestion from signatures is the one from tensors, and it converts A into B exactly."""
    full = suggest_mapping(a, b)
    found = suggest_from_signatures(signatures(a), signatures(b))
    assert found.mapping == full.mapping
    assert evidence(found) == evidence(full)
    assert (found.unmatched_a, found.unmatched_b) == (full.unmatched_a, full.unmatched_b)
    assert found.complete and reproduces(a, b, found)
    return found


# --- the real ports of issue #11 ---------------------------------------------------------------------

def _llama() -> tuple[State, State]:
    pytest.importorskip("transformers")
    pytest.importorskip("torchtune")
    return ports.hf_llama().state_dict(), ports.tune_llama().state_dict()


def _gpt2() -> tuple[State, State]:
    pytest.importorskip("transformers")
    return ports.hf_gpt2().state_dict(), ports.port_gpt2().state_dict()


PAIRS: dict[str, Callable[[], tuple[State, State]]] = {
    "llama": _llama, "gpt2": _gpt2,
    "mha": lambda: (ports.mha_packed().state_dict(), ports.mha_split().state_dict()),
    "shared_act": lambda: (ports.shared_act().state_dict(), ports.split_act().state_dict())}
EXPECT = {"llama": {"identical": 17, "rope": 4}, "gpt2": {"identical": 19, "transpose": 6, "split": 4},
          "mha": {"identical": 14, "split": 4}, "shared_act": {"identical": 32}}
_built: dict[str, tuple[State, State]] = {}


@pytest.mark.parametrize("backwards", [False, True], ids=["a_to_b", "b_to_a"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_real_ports_give_the_mapping_of_the_full_tensors(name: str, backwards: bool) -> None:
    if name not in _built:
        _built[name] = PAIRS[name]()
    a, b = _built[name][::-1] if backwards else _built[name]
    found = agree(a, b)
    want = dict(EXPECT[name])
    if backwards and "split" in want:
        want["concat"] = want.pop("split")
    assert found.counts() == want


def test_llama_rope_rules_are_the_converters_permutation() -> None:
    if "llama" not in _built:
        _built["llama"] = _llama()
    a, b = _built["llama"]
    rules = {r.a[0]: r.transform for r in suggest_from_signatures(signatures(a), signatures(b)).mapping.rules}
    assert rules["model.layers.{i}.self_attn.q_proj.weight"] == Rearrange("(h two d) c -> (h d two) c",
                                                                          (("h", 4), ("two", 2)))
    assert rules["model.layers.{i}.self_attn.k_proj.weight"] == Rearrange("(h two d) c -> (h d two) c",
                                                                          (("h", 2), ("two", 2)))


# --- each layout change on its own ---------------------------------------------------------------------

def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_transposed() -> None:
    w = randn(3, 5)
    found = agree({"enc.0.w": w, "enc.0.b": randn(5, seed=1)},
                  {"layers.0.weight": w.T.contiguous(), "layers.0.bias": randn(5, seed=1)})
    assert found.mapping.rules[0].transform == Transpose(0, 1) and found.pairs[0].method == "transpose"


def test_rows_permuted_within_heads() -> None:
    """HF's rotary halves against Meta's interleaved pairs: rows permuted within each head."""
    heads, d, c = 4, 6, 8
    q, k, bias = randn(heads * 2 * d, c), randn(2 * 2 * d, c, seed=1), randn(heads * 2 * d, seed=2)

    def interleave(t: torch.Tensor, h: int) -> torch.Tensor:  # (h two d) -> (h d two)
        return t.view(h, 2, d, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    found = agree({"layers.0.self_attn.q_proj.weight": q, "layers.0.self_attn.k_proj.weight": k,
                   "layers.0.self_attn.q_proj.bias": bias},
                  {"layers.0.attention.wq.weight": interleave(q, heads),
                   "layers.0.attention.wk.weight": interleave(k, 2), "layers.0.attention.wq.bias": interleave(bias, heads)})
    assert {p.method for p in found.pairs} == {"rope"}
    assert {r.transform for r in found.mapping.rules} == {
        Rearrange("(h two d) c -> (h d two) c", (("h", heads), ("two", 2))),
        Rearrange("(h two d) c -> (h d two) c", (("h", 2), ("two", 2))),
        Rearrange("(h two d) -> (h d two)", (("h", heads), ("two", 2)))}
    # The same rows in another order that no RoPE convention makes: no partner, as for full tensors.
    shuffled = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(0))]
    found = suggest_from_signatures({"q": param_signature(q)}, {"wq": param_signature(shuffled)})
    assert found.unmatched_a == ("q",) and found.unmatched_b == ("wq",)


def test_three_concatenated_along_dim_0_and_split_back() -> None:
    q, k, v = randn(4, 6), randn(4, 6, seed=1), randn(4, 6, seed=2)
    bias = [randn(4, seed=s) for s in (3, 4, 5)]
    a = {"attn.q.weight": q, "attn.k.weight": k, "attn.v.weight": v, "attn.q.bias": bias[0], "attn.k.bias": bias[1],
         "attn.v.bias": bias[2]}
    b = {"attn.qkv.weight": torch.cat([q, k, v]), "attn.qkv.bias": torch.cat(bias)}
    found = agree(a, b)
    assert {r.transform for r in found.mapping.rules} == {Concat(0)}
    back = agree(b, a)
    assert {r.transform for r in back.mapping.rules} == {Split(0, None, 3)}


def test_split_into_unequal_parts() -> None:  # GQA: q has more rows than k and v
    fused = randn(16, 4)
    parts = {"wq.weight": fused[:8], "wk.weight": fused[8:12], "wv.weight": fused[12:]}
    found = agree({"wqkv.weight": fused}, {k: v.contiguous() for k, v in parts.items()})
    assert found.mapping.rules[0].transform == Split(0, (8, 4, 4))


def test_conv1d_split_into_transposed_linears() -> None:  # GPT-2 c_attn [in, 3E] -> q, k, v [E, in]
    e = 6
    c_attn, bias = randn(e, 3 * e), randn(3 * e, seed=1)
    a = {"h.0.attn.c_attn.weight": c_attn, "h.0.attn.c_attn.bias": bias}
    b = {}
    for n, name in enumerate("qkv"):
        b[f"blocks.0.{name}.weight"] = c_attn[:, n * e:(n + 1) * e].T.contiguous()
        b[f"blocks.0.{name}.bias"] = bias[n * e:(n + 1) * e].clone()
    found = agree(a, b)
    weight = next(r for r in found.mapping.rules if r.a[0].endswith("weight"))
    assert weight.transform == Chain((Split(1, None, 3), Transpose(0, 1)))
    back = agree(b, a)  # and the parts concatenated back into a Conv1D
    assert next(r for r in back.mapping.rules if r.b[0].endswith("weight")).transform == Chain(
        (Concat(0), Transpose(0, 1)))


def test_reshape_through_dims_of_size_one() -> None:  # a 1x1 convolution is a Linear
    w = randn(6, 4)
    found = agree({"conv.weight": w[:, :, None, None].contiguous()}, {"proj.weight": w})
    assert found.pairs[0].method == "reshape"


def test_identical_norm_weights_are_paired_by_name() -> None:
    """Every LayerNorm holds ones and zeros: content cannot tell them apart, names and order do."""
    a, b = reference_model().state_dict(), port_model().state_dict()
    found = agree(a, b)
    shared = [p for p in found.pairs if p.confidence == "medium"]
    assert shared and all("share this content" in p.note for p in shared)
    norms = {p.a_keys[0]: p.b_keys[0] for p in found.pairs if "norm" in p.a_keys[0]}
    assert norms == {f"layers.{i}.norm{n}.{x}": f"blocks.{i}.{part}_norm.{x}" for i in (0, 1)
                     for n, part in ((1, "attn"), (2, "mlp")) for x in ("weight", "bias")} | {
        f"final_norm.{x}": f"norm.{x}" for x in ("weight", "bias")}


def test_a_tensor_without_partner_is_unmatched() -> None:
    w = randn(3, 4)
    found = suggest_from_signatures(signatures({"enc.w": w, "enc.extra": randn(7, seed=1)}),
                                    signatures({"dec.weight": w.clone(), "dec.other": randn(2, 2, seed=2)}))
    assert found.unmatched_a == ("enc.extra",) and found.unmatched_b == ("dec.other",)
    assert not found.complete and found.exit_code == 1
    assert "# Unmatched keys of A" in found.to_yaml() and "[7] float32" in found.to_yaml()
    assert found.source_a == "signatures of 2 parameters"


def test_a_cast_pairs_only_by_statistics_and_with_low_confidence() -> None:
    w = randn(64, 32)
    a, b = {"enc.w": w}, {"dec.weight": w.bfloat16()}
    assert suggest_from_signatures(signatures(a), signatures(b)).unmatched_a == ("enc.w",)
    found = suggest_from_signatures(signatures(a, stats=True), signatures(b, stats=True))
    assert [(p.method, p.confidence) for p in found.pairs] == [("statistics", "low")]
    assert "elements not compared" in found.pairs[0].note and "LOW CONFIDENCE" in found.to_yaml()


def test_wrong_input_says_what_to_pass() -> None:
    with pytest.raises(UsageError, match="fix: pass"):
        suggest_from_signatures({"w": torch.ones(2)}, {})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="meta tensor"):
        param_signature(torch.empty(2, device="meta"))


# --- the signature -----------------------------------------------------------------------------------------

def test_size_and_the_row_column_duality() -> None:
    w = randn(5, 7)
    sig = param_signature(w)
    assert sig.matrix == (5, 7) and sig.rows.shape == (5,) and sig.cols.shape == (7,)
    t = param_signature(w.T.contiguous())
    assert torch.equal(t.rows, sig.cols) and torch.equal(t.cols, sig.rows)
    assert param_signature(w[:, :, None]).matrix == (5, 7)  # dims of size 1 do not count
    assert param_signature(randn(4, 3, 2)).matrix == (4, 6)
    assert param_signature(randn(9)).matrix == (9, 1) and param_signature(torch.tensor(2.0)).matrix == (1, 1)
    # A part's rows are the rows of the whole it was cut from, wherever it lies.
    whole = param_signature(torch.cat([w, w.flip(0)]))
    assert torch.equal(whole.rows[5:], param_signature(w.flip(0)).rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                   torch.int64, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn])
def test_every_dtype_equal_content_equal_digests(dtype: torch.dtype) -> None:
    w = (randn(6, 4) * 10).to(dtype) if dtype != torch.float8_e4m3fn else randn(6, 4).to(dtype)
    if dtype.is_complex:
        w = torch.complex(randn(6, 4), randn(6, 4, seed=1)).to(dtype)
    sig = param_signature(w)
    assert sig == param_signature(w.clone()) and sig.dtype == dtype
    assert torch.equal(param_signature(w.T.contiguous()).rows, sig.cols)
    other = w.clone()
    other.view(torch.uint8).view(-1)[5] ^= 1  # one bit of one element
    changed = param_signature(other)
    assert (changed.rows != sig.rows).sum() == 1 and (changed.cols != sig.cols).sum() == 1


def test_a_change_shared_by_every_element_is_always_seen() -> None:
    """A negation flips every sign bit (zeros too), a scaling by 2**k moves every exponent: the same
    change of every word, which modular sums could miss by parity; the weights make sure they do not."""
    x, y = randn(64, 32), torch.rand(64, 32) + 0.5
    x[0, 0] = 0.0
    for before, after in ((x, -x), (y, y * 2), (y, y / 4)):
        sig, other = param_signature(before), param_signature(after)
        assert (other.rows != sig.rows).all() and (other.cols != sig.cols).all()
    # The blind spot, said in the module's docstring: two sign flips away from the first element.
    flipped = x.clone()
    flipped[3, 1:3] *= -1
    assert torch.equal(param_signature(flipped).rows, param_signature(x).rows)


def test_integer_products_are_exact_modulo_2_32_on_every_route() -> None:
    x = torch.randint(-2**31, 2**31 - 1, (37, 300), dtype=torch.int32)
    x[0] = -2**31  # the extremes
    x[1] = 2**31 - 1
    w = _weights(37, torch.device("cpu"))
    exact = (w.numpy().astype(object) @ x.numpy().astype(object)) % 2**32
    assert (_sums(w, x) == exact.astype(np.uint64)).all()
    # The accelerators' route (no integer matrix product there), run here in small chunks.
    for chunk in (1, 64, 1 << 24):
        assert (_sums_by_parts(w.to(torch.int64), x, chunk) == exact.astype(np.uint64)).all()


@pytest.mark.skipif(_param_signature._fused is None, reason="the C accelerator is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.complex64,
                                   torch.int64])
@pytest.mark.parametrize("shape", [(1,), (9,), (5, 7), (300, 37), (16, 3, 5), (1, 64, 1), (), (0, 3)])
def test_the_accelerator_signs_as_the_matrix_products_do(dtype: torch.dtype, shape: tuple[int, ...],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    w = randn(*shape) * 1e4 if shape else torch.tensor(-3.5)
    w = torch.complex(w, -w).to(dtype) if dtype.is_complex else w.to(dtype)
    if dtype == torch.int64 and w.numel():
        w.view(-1)[0] = -2**63  # words at the extremes
    fast = param_signature(w)
    monkeypatch.setattr(_param_signature, "_fused", None)
    slow = param_signature(w)
    assert fast == slow and fast.rows.dtype == torch.int64 and fast.cols.is_contiguous()
    assert (fast.rows != 0).all()


@pytest.mark.skipif(_param_signature._fused is None, reason="the C accelerator is not built here")
def test_the_accelerator_refuses_buffers_that_do_not_fit() -> None:
    words, w = np.zeros((3, 4), np.int32), np.ones(8, np.int32)
    rows, cols = np.zeros(3, np.int64), np.zeros(4, np.int64)
    _param_signature._fused.signature(words, 3, 4, 1, w, w, rows, cols)  # fits
    for args in ((words, 3, 5, 1, w, w, rows, cols),  # more words than given
                 (words, 3, 4, 1, w[:3], w, rows, cols),  # too few weights
                 (words, 3, 4, 3, w, w, rows, cols),  # width not a multiple of k
                 (words, 3, 4, 1, w, w, rows[:2], cols)):  # no room for the rows
        with pytest.raises(ValueError, match="wrong size or alignment"):
            _param_signature._fused.signature(*args)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_signing_is_vectorised_no_loop_over_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C accelerator, a few whole-tensor operations: as many for 4096 rows as for 8
    (two integer matrix products read the tensor; the rest acts on the R + C digests)."""
    monkeypatch.setattr(_param_signature, "_fused", None)
    counts = {}
    for rows in (8, 4096):
        t = torch.randn(rows, 1024)
        param_signature(t)  # weights made once, as in a capture
        with _Count() as mode:
            param_signature(t)
        counts[rows] = mode.ops
    assert len(counts[8]) == len(counts[4096]) <= 20
    views = ("detach", "view", "slice", "alias", "permute", "select", "lift_fresh")
    computed = [[op for op in ops if not any(f"aten.{v}." in op for v in views)] for ops in counts.values()]
    assert computed == [["aten.mm.default"] * 2] * 2


def test_serialisation_round_trip_through_safetensors(tmp_path: Path) -> None:
    sigs = {"w": param_signature(randn(4, 3), stats=True), "b": param_signature(torch.zeros(3, dtype=torch.bfloat16))}
    records = {}
    tensors = {}
    for key, sig in sigs.items():
        tensors[key], records[key] = sig.to_tensors()
        assert tensors[key].dtype == torch.int64 and tensors[key].shape == (sum(sig.matrix),)
    save_file(tensors, str(tmp_path / "sigs.safetensors"))
    back = load_file(str(tmp_path / "sigs.safetensors"))
    assert {k: ParamSignature.from_tensors(back[k], records[k]) for k in sigs} == sigs
    assert records["b"] == {"schema": "tensorparity.signature/1", "shape": [3], "dtype": "bfloat16", "stats": None}
    with pytest.raises(CorruptCheckpointError, match="needs int64 \\[7\\] digests.*fix: capture the trace again"):
        ParamSignature.from_tensors(back["w"][:-1], records["w"])
    with pytest.raises(CorruptCheckpointError, match="schema 'other/2'"):
        ParamSignature.from_tensors(back["w"], {**records["w"], "schema": "other/2"})
