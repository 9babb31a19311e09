"""Tensor transforms: results on real tensors, inverses, binding, and their specs."""

from __future__ import annotations

import pytest
import torch

from tensorparity.mapping import (
    Cast,
    Chain,
    Concat,
    Mapping,
    MappingError,
    NotInvertibleError,
    Permute,
    Rearrange,
    Reshape,
    Rule,
    Split,
    TransformSpecError,
    Transpose,
    apply_mapping,
    register_transform,
    transform_from_dict,
)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.permute: Meta/torchtune layout -> HF layout."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_rope_permutation_matches_the_hf_converter() -> None:
    heads, head_dim, dim, kv_heads = 4, 8, 32, 2
    meta_q = torch.randn(heads * head_dim, dim)
    meta_k = torch.randn(kv_heads * head_dim, dim)
    hf = {"wq.weight": hf_permute(meta_q, heads), "wk.weight": hf_permute(meta_k, kv_heads)}
    hf_to_meta = Mapping([
        Rule("wq.weight", "q.weight", {"rearrange": "(h two d) c -> (h d two) c", "h": heads, "two": 2}),
        Rule("wk.weight", "k.weight", {"rearrange": "(h two d) c -> (h d two) c", "h": kv_heads, "two": 2}),
    ])
    meta = apply_mapping(hf, hf_to_meta).checkpoint
    assert torch.equal(meta["q.weight"].load(), meta_q)
    assert torch.equal(meta["k.weight"].load(), meta_k)
    back = apply_mapping({"q.weight": meta_q, "k.weight": meta_k}, hf_to_meta, direction="b_to_a").checkpoint
    assert torch.equal(back["wq.weight"].load(), hf["wq.weight"])
    assert torch.equal(back["wk.weight"].load(), hf["wk.weight"])


def test_transpose_and_permute_invert() -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(Transpose(0, 2).inverse().apply(Transpose(0, 2).apply([x]))[0], x)
    p = Permute((2, 0, 1))
    assert p.apply([x])[0].shape == (4, 2, 3)
    assert torch.equal(p.inverse().apply(p.apply([x]))[0], x)
    with pytest.raises(TransformSpecError, match="not a permutation"):
        Permute((0, 0, 1))
    with pytest.raises(ValueError, match="needs a 3-d tensor"):
        p.apply([torch.zeros(2, 2)])


def test_reshape_needs_its_source_shape_to_invert() -> None:
    with pytest.raises(NotInvertibleError) as err:
        Reshape((-1,)).inverse()
    assert "bind the mapping to a checkpoint of side A" in err.value.fix
    bound = Reshape((-1,)).bind([torch.empty(3, 4, device="meta")])
    x = torch.randn(3, 4)
    assert torch.equal(bound.inverse().apply(bound.apply([x]))[0], x)
    with pytest.raises(ValueError, match=r"expects shape \[3, 4\]"):
        bound.apply([torch.zeros(4, 3)])


def test_concat_inverse_uses_the_sizes_it_joined() -> None:
    # Grouped-query attention: q is larger than k and v, so equal parts would be wrong.
    q, k, v = torch.randn(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    concat = Concat(0).bind([q, k, v])
    assert concat == Concat(0, (8, 2, 2))
    parts = concat.inverse().apply(concat.apply([q, k, v]))
    assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v)))
    with pytest.raises(ValueError, match=r"add up to 10, but dim 0 has 12"):
        Split(0, (8, 2)).apply([torch.zeros(12, 4)])
    with pytest.raises(ValueError, match="does not split into 5 equal parts"):
        Split(0, parts=5).apply([torch.zeros(12, 4)])


def test_cast_is_lossy_unless_it_widens() -> None:
    assert Cast(torch.bfloat16, torch.float32).lossy
    assert not Cast(torch.float32, torch.bfloat16).lossy
    assert Cast(torch.float16).lossy  # unknown source: assume the worst
    with pytest.raises(NotInvertibleError, match="cannot be undone"):
        Cast(torch.float32).inverse()
    x = torch.randn(5).to(torch.bfloat16)
    up = Cast(torch.float32).bind([x])
    assert torch.equal(up.inverse().apply(up.apply([x]))[0], x)
    assert "(lossy)" in up.inverse().describe()


def test_chain_inverts_in_reverse_order() -> None:
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    chain = Chain((Concat(0), Transpose(0, 1), Cast(torch.float64))).bind([a, b])
    out = chain.apply([a, b])[0]
    assert out.shape == (5, 5) and out.dtype == torch.float64
    back = chain.inverse().apply([out])
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


@pytest.mark.parametrize("transform", [
    Rearrange("(h two d) c -> (h d two) c", (("h", 4), ("two", 2))),
    Transpose(0, 1), Permute((1, 2, 0)), Reshape((2, -1)), Reshape((6,), (2, 3)),
    Concat(1), Concat(0, (4, 2)), Split(0, (4, 2)), Split(1, parts=3), Cast(torch.bfloat16),
    Cast(torch.float16, torch.float32), Chain((Concat(0), Transpose(0, 1))),
])
def test_specs_round_trip(transform: object) -> None:
    assert transform_from_dict(transform.to_dict()) == transform  # type: ignore[attr-defined]


@pytest.mark.parametrize(("spec", "fix"), [
    ({"rearange": "a b -> b a"}, "did you mean 'rearrange'?"),
    ({"rearrange": "a b -> b c"}, "name the same axes on both sides"),
    ({"rearrange": "a b"}, "write it as einops does"),
    ({"rearrange": "(a b) -> (b a)", "c": 2}, "size only the pattern's axes: a, b"),
    ({"transpose": [0, 1, 2]}, "write transpose: [0, 1]"),
    ({"cast": "float33"}, "use a torch dtype name"),
    ({"concat": {"axis": 0}}, "use only dim, sizes"),
    ({"concat": {}, "split": {}}, "write several steps as a list"),
    ({"split": {"sizes": [1, 2], "parts": 3}}, "give sizes or parts, not both"),
    ("transpose", "name one of:"),
])
def test_bad_specs_name_the_fix(spec: object, fix: str) -> None:
    with pytest.raises(TransformSpecError) as err:
        transform_from_dict(spec)
    assert fix in err.value.fix


def test_registered_transforms_load_from_specs() -> None:
    register_transform("flip0", lambda value, extra: Permute((1, 0)))
    m = Mapping.from_dict({"rules": [{"a": "w", "b": "w_t", "transform": {"flip0": None}}]})
    x = torch.randn(2, 3)
    assert torch.equal(apply_mapping({"w": x}, m).checkpoint["w_t"].load(), x.t())


def test_a_transform_that_does_not_fit_its_rule_is_reported() -> None:
    with pytest.raises(MappingError, match=r"transpose turns each key into one key"):
        Rule(["a", "b"], "ab", Transpose(0, 1))


@pytest.mark.parametrize(("shapes", "dtypes", "dim"), [
    ([(3, 4), (5, 4)], [torch.float32, torch.float32], 0),
    ([(3, 4), (3, 2)], [torch.bfloat16, torch.float32], -1),
    ([(2,), (1,), (4,)], [torch.int64, torch.int64, torch.int64], 0),
])
def test_concat_infers_on_meta_what_torch_cat_gives(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype],
                                                    dim: int) -> None:
    real = [torch.ones(s, dtype=d) for s, d in zip(shapes, dtypes)]
    meta = [t.to("meta") for t in real]
    expected = torch.cat(real, dim)
    (inferred,) = Concat(dim).apply(meta)
    assert (inferred.shape, inferred.dtype, inferred.device.type) == (expected.shape, expected.dtype, "meta")


@pytest.mark.parametrize(("shapes", "message"), [
    ([(3, 4), (5, 3)], "sizes must match except along dim 0: tensor 1 has 3 in dim 1, tensor 0 has 4"),
    ([(3, 4), (5,)], "tensor 1 has 1 dims, tensor 0 has 2"),
])
def test_concat_on_meta_refuses_what_torch_cat_refuses(shapes: list[tuple[int, ...]], message: str) -> None:
    with pytest.raises(RuntimeError):
        torch.cat([torch.ones(s) for s in shapes])
    with pytest.raises(ValueError, match=message):
        Concat(0).apply([torch.empty(s, device="meta") for s in shapes])
