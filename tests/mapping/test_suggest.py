"""Mapping suggestion from content: two real implementations of one model, converted by their
converter, get a mapping that makes ``diff`` pass with no hand edits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from tensorparity.checks import diff
from tensorparity.errors import UsageError
from tensorparity.examples import from_reference, port_model, reference_model
from tensorparity.mapping import Concat, Mapping, Rearrange, Split, Transpose, apply_mapping
from tensorparity.mapping.suggest import detect_prefixes, suggest_mapping


def rules_of(mapping: Mapping) -> set[tuple[tuple[str, ...], tuple[str, ...], str]]:
    return {(r.a, r.b, repr(r.transform.to_dict()) if r.transform else "") for r in mapping.rules}


def test_reference_vs_port_finds_the_converters_mapping(example_mapping: Mapping, tmp_path: Path) -> None:
    s = suggest_mapping(reference_model(), port_model())
    assert s.complete and s.exit_code == 0
    assert diff(reference_model(), port_model(), mapping=s.mapping).verdict == "identical"
    # The same rules as the hand-written file that ships with the example (renames + fused qkv).
    assert rules_of(s.mapping) == rules_of(example_mapping)
    # LayerNorms are all ones: content cannot tell norm1 from norm2, module order does.
    assert ("layers.{i}.norm1.{p}",) in {r.a for r in s.mapping.rules}
    low = [p for p in s.pairs if p.confidence != "high"]
    assert low and all(p.confidence == "medium" and "share this content" in p.note for p in low)
    path = tmp_path / "map.yaml"
    path.write_text(s.to_yaml())
    assert Mapping.from_yaml(path) == s.mapping
    assert "# medium confidence" in s.to_yaml()


def test_files_with_a_lightning_wrapper_and_the_reverse_split(tmp_path: Path) -> None:
    ref = reference_model().state_dict()
    ckpt = tmp_path / "ref.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.items()}, "epoch": 3, "global_step": 9,
                "pytorch-lightning_version": "2.4.0", "optimizer_states": [], "lr_schedulers": []}, ckpt)
    port = tmp_path / "port.safetensors"
    save_file(from_reference(ref), str(port))
    s = suggest_mapping(ckpt, port)
    assert s.mapping.prefix_a == "model." and s.complete
    assert diff(ckpt, port, mapping=s.mapping).passed
    # The other way round the port's qkv is split into the reference's q, k, v.
    back = suggest_mapping(port, ckpt)
    splits = [r for r in back.mapping.rules if isinstance(r.transform, Split)]
    assert len(splits) == 1 and splits[0].a == ("blocks.{i}.qkv.{p}",) and len(splits[0].b) == 3
    assert back.mapping.prefix_b == "model." and diff(port, ckpt, mapping=back.mapping).passed


# --- a small Llama in two layouts: HF (rotate-half RoPE, GPT-2 Conv1D) and Meta (interleaved RoPE) ---

def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


DIM, HEADS, KV, HIDDEN, VOCAB, LAYERS = 32, 4, 2, 48, 50, 2
HD = DIM // HEADS


def angles(t: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    return torch.outer(torch.arange(t).float(), inv)  # (t, HD/2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k, v = (x.repeat_interleave(HEADS // KV, dim=1) for x in (k, v))
    mask = torch.full((q.shape[2], q.shape[2]), -math.inf).triu(1)
    y = ((q @ k.transpose(-1, -2)) / math.sqrt(HD) + mask).softmax(-1) @ v
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], DIM)


class HFLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name, out in (("q_proj", HEADS * HD), ("k_proj", KV * HD), ("v_proj", KV * HD), ("o_proj", DIM)):
            setattr(self.self_attn, name, nn.Linear(DIM, out, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.mlp.down_proj = Conv1D(HIDDEN, DIM)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(DIM), RMSNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, t = self.self_attn, x.shape[0], x.shape[1]
        h = rms(x, self.input_layernorm.weight)
        q, k, v = (p(h).view(b, t, -1, HD).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        cos, sin = (f(torch.cat([angles(t)] * 2, -1)) for f in (torch.cos, torch.sin))

        def rot(y: torch.Tensor) -> torch.Tensor:  # rotate_half
            return y * cos + torch.cat([-y[..., HD // 2:], y[..., :HD // 2]], -1) * sin

        x = x + a.o_proj(attention(rot(q), rot(k), v))
        h = rms(x, self.post_attention_layernorm.weight)
        return x + self.mlp.down_proj(nn.functional.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class HFLlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.model.layers = nn.ModuleList(HFLayer() for _ in range(LAYERS))
        self.model.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(rms(x, self.model.norm.weight))


class MetaLayer(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.attention = nn.Module()
        for name, out in (("wq", HEADS * HD), ("wk", KV * HD), ("wv", KV * HD), ("wo", DIM)):
            setattr(self.attention, name, nn.Linear(DIM, out, bias=False))
        self.feed_forward = nn.Module()
        if fused:
            self.feed_forward.w13 = nn.Linear(DIM, 2 * HIDDEN, bias=False)
        else:
            self.feed_forward.w1, self.feed_forward.w3 = (nn.Linear(DIM, HIDDEN, bias=False) for _ in range(2))
        self.feed_forward.w2 = nn.Linear(HIDDEN, DIM)
        self.attention_norm, self.ffn_norm = RMSNorm(DIM), RMSNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, f, b, t = self.attention, self.feed_forward, x.shape[0], x.shape[1]
        h = rms(x, self.attention_norm.weight)
        q, k, v = (p(h).view(b, t, -1, HD).transpose(1, 2) for p in (a.wq, a.wk, a.wv))
        cos, sin = torch.cos(angles(t)), torch.sin(angles(t))

        def rot(y: torch.Tensor) -> torch.Tensor:  # interleaved pairs
            y0, y1 = y.unflatten(-1, (HD // 2, 2)).unbind(-1)
            return torch.stack([y0 * cos - y1 * sin, y0 * sin + y1 * cos], -1).flatten(-2)

        x = x + a.wo(attention(rot(q), rot(k), v))
        h = rms(x, self.ffn_norm.weight)
        gate, up = f.w13(h).chunk(2, -1) if self.fused else (f.w1(h), f.w3(h))
        return x + f.w2(nn.functional.silu(gate) * up)


class MetaLlama(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(MetaLayer(fused) for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(rms(x, self.norm.weight))


def hf_to_meta(state: dict[str, torch.Tensor], *, fused: bool) -> dict[str, torch.Tensor]:
    """The converter: HF names and layouts -> Meta's (RoPE rows interleaved, Conv1D transposed)."""

    def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:  # (h two d) c -> (h d two) c
        return w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    out = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attention.wq.weight"] = interleave(state[src + "self_attn.q_proj.weight"], HEADS)
        out[dst + "attention.wk.weight"] = interleave(state[src + "self_attn.k_proj.weight"], KV)
        out[dst + "attention.wv.weight"] = state[src + "self_attn.v_proj.weight"]
        out[dst + "attention.wo.weight"] = state[src + "self_attn.o_proj.weight"]
        gate, up = state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]
        if fused:
            out[dst + "feed_forward.w13.weight"] = torch.cat([gate, up])
        else:
            out[dst + "feed_forward.w1.weight"], out[dst + "feed_forward.w3.weight"] = gate, up
        out[dst + "feed_forward.w2.weight"] = state[src + "mlp.down_proj.weight"].T
        out[dst + "feed_forward.w2.bias"] = state[src + "mlp.down_proj.bias"]
        out[dst + "attention_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = state[src + "post_attention_layernorm.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize("fused", [True, False], ids=["w13-fused", "w1-w3"])
def test_hf_llama_vs_meta_layout(fused: bool) -> None:
    torch.manual_seed(0)
    hf = HFLlama().eval()
    meta = MetaLlama(fused).eval()
    meta.load_state_dict(hf_to_meta(hf.state_dict(), fused=fused))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():  # the converter is right: both layouts compute one function
        torch.testing.assert_close(meta(ids), hf(ids))

    s = suggest_mapping(hf, meta)
    assert s.complete, s.to_yaml()
    assert diff(hf, meta, mapping=s.mapping).passed
    rules = {r.b[0]: r for r in s.mapping.rules}
    wq, wk = rules["layers.{i}.attention.wq.weight"], rules["layers.{i}.attention.wk.weight"]
    assert wq.a == ("model.layers.{i}.self_attn.q_proj.weight",)
    assert isinstance(wq.transform, Rearrange) and dict(wq.transform.sizes) == {"h": HEADS, "two": 2}
    assert isinstance(wk.transform, Rearrange) and dict(wk.transform.sizes) == {"h": KV, "two": 2}
    assert isinstance(rules["layers.{i}.feed_forward.w2.weight"].transform, Transpose)
    if fused:
        w13 = rules["layers.{i}.feed_forward.w13.weight"]
        assert w13.a == ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")
        assert isinstance(w13.transform, Concat) and w13.transform.dim == 0
    # Norms are all ones; module order pairs input_layernorm with attention_norm.
    assert rules["layers.{i}.attention_norm.weight"].a == ("model.layers.{i}.input_layernorm.weight",)
    # One rule per kind of weight, not one per layer.
    assert all("{i}" in r.a[0] for r in s.mapping.rules if "layers" in r.a[0])
    # The way back (Meta -> HF) inverts every transform found.
    back = suggest_mapping(meta, hf)
    assert back.complete and diff(meta, hf, mapping=back.mapping).passed


# --- smaller behaviours -------------------------------------------------------------------------

def test_pure_rename_uses_p_for_weight_and_bias() -> None:
    torch.manual_seed(1)
    a = {f"enc.{i}.{p}": torch.randn(4, 3) if p == "w" else torch.randn(4) for i in range(3) for p in "wb"}
    b = {f"encoder.layer{i}.{'weight' if p == 'w' else 'bias'}": v for i in range(3) for p in "wb"
         for v in [a[f"enc.{i}.{p}"]]}
    s = suggest_mapping(a, b)
    assert s.complete and all(p.method == "identical" and p.confidence == "high" for p in s.pairs)
    assert apply_mapping(a, s.mapping).unmapped == ()
    assert diff(a, b, mapping=s.mapping).verdict == "identical"
    # Indices are not whole components of B's keys (layer0), so each layer gets its rule.
    c = {f"blocks.{i}.attn.{p}": a[f"enc.{i}.{p}"] for i in range(3) for p in "wb"}
    rules = suggest_mapping(a, c).mapping.rules
    assert [r.to_dict() for r in rules] == [{"a": "enc.{i}.{p}", "b": "blocks.{i}.attn.{p}"}]


def test_unmatched_keys_are_reported_and_buffers_ignored(tmp_path: Path) -> None:
    torch.manual_seed(2)
    w = torch.randn(5, 5)
    a = {"net.proj.weight": w, "net.extra.weight": torch.randn(3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    b = {"proj.w": w.clone(), "head.scale": torch.randn(2)}
    s = suggest_mapping(a, b)
    assert not s.complete and s.exit_code == 1
    assert s.unmatched_a == ("net.extra.weight",) and s.unmatched_b == ("head.scale",)
    assert s.ignored_a == ("bn.num_batches_tracked",) and s.mapping.ignore_a == ("*.num_batches_tracked",)
    text = s.to_yaml()
    assert "#   net.extra.weight  [3, 3] float32" in text and "#   head.scale  [2] float32" in text
    assert "unmatched: 1 of A, 1 of B" in s.summary()
    path = tmp_path / "m.yaml"
    path.write_text(text)
    assert Mapping.from_yaml(path) == s.mapping
    report = diff(a, b, mapping=path)
    assert [k.key for k in report.only_in_a] == ["net.extra.weight"] and not report.mismatches


def test_output_is_deterministic() -> None:
    first = suggest_mapping(reference_model(), port_model()).to_yaml()
    assert suggest_mapping(reference_model(), port_model()).to_yaml() == first


def test_prefix_detection() -> None:
    assert detect_prefixes(["module.a.w", "module.b.w"], ["a.w", "b.w"]) == ("module.", "")
    assert detect_prefixes(["model.enc.a", "model.enc.b"], ["enc.a", "enc.b"]) == ("model.", "")
    assert detect_prefixes(["enc.a", "enc.b"], ["enc.a", "enc.b"]) == ("", "")
    # Nothing matches by name: a wrapper on every key of one side is stripped anyway.
    assert detect_prefixes(["model.l.0.q", "model.l.1.q"], ["blocks.0.wq", "blocks.1.wq"]) == ("model.", "")


def test_ddp_prefix_and_name_matches_pass_through() -> None:
    torch.manual_seed(3)
    b = {"enc.weight": torch.randn(4, 4), "head.weight": torch.randn(2, 4), "fc.weight": torch.randn(6, 4)}
    a = {"module.enc.weight": b["enc.weight"], "module.head.weight": b["head.weight"],
         "module.fc.w": b["fc.weight"].T.contiguous()}
    s = suggest_mapping(a, b)
    assert s.mapping.prefix_a == "module." and s.complete
    assert [p.method for p in s.pairs] == ["name", "name", "transpose"]
    assert [r.to_dict() for r in s.mapping.rules] == [{"a": "fc.w", "b": "fc.weight",
                                                      "transform": {"transpose": [0, 1]}}]
    assert diff(a, b, mapping=s.mapping).verdict == "identical"


def test_cast_and_close_values() -> None:
    torch.manual_seed(4)
    a = {"x.weight": torch.randn(8, 8), "y.weight": torch.randn(16), "z.weight": torch.randn(6, 6)}
    b = {"x_bf16": a["x.weight"].to(torch.bfloat16), "y_tuned": a["y.weight"] + 1e-3 * torch.randn(16),
         "z_half": a["z.weight"].half()}
    s = suggest_mapping(a, b)
    by_b = {p.b_keys[0]: p for p in s.pairs}
    assert by_b["x_bf16"].method == "cast"
    assert by_b["x_bf16"].transform.to_dict() == {"cast": {"dtype": "bfloat16", "from": "float32"}}
    assert by_b["y_tuned"].method == "statistics" and by_b["y_tuned"].confidence == "low"
    assert "LOW CONFIDENCE" in s.to_yaml()
    report = diff(a, b, mapping=s.mapping)
    assert {t.key for t in report.tensors if t.passed} == {"x_bf16", "z_half"}  # y was re-trained: it differs


def test_gpt2_fused_transposed_c_attn_both_ways() -> None:
    """GPT-2 keeps q, k, v in one Conv1D: c_attn.weight = cat([q.T, k.T, v.T], dim=1)."""
    torch.manual_seed(7)
    sep = {f"h.{i}.attn.{p}.{kind}": torch.randn(6, 6) if kind == "weight" else torch.randn(6)
           for i in range(2) for p in ("q", "k", "v") for kind in ("weight", "bias")}
    gpt2 = {}
    for i in range(2):
        parts = [sep[f"h.{i}.attn.{p}.weight"] for p in ("q", "k", "v")]
        gpt2[f"h.{i}.attn.c_attn.weight"] = torch.cat([w.T for w in parts], dim=1)
        gpt2[f"h.{i}.attn.c_attn.bias"] = torch.cat([sep[f"h.{i}.attn.{p}.bias"] for p in ("q", "k", "v")])
    s = suggest_mapping(sep, gpt2)
    assert s.complete and diff(sep, gpt2, mapping=s.mapping).verdict == "identical"
    weight = next(r for r in s.mapping.rules if r.b == ("h.{i}.attn.c_attn.weight",))
    assert weight.transform.to_dict() == {"chain": [{"concat": {"dim": 0}}, {"transpose": [0, 1]}]}
    back = suggest_mapping(gpt2, sep)
    assert back.complete and diff(gpt2, sep, mapping=back.mapping).verdict == "identical"
    assert {p.method for p in back.pairs} == {"split"}


def test_template_only_when_it_covers_every_index() -> None:
    torch.manual_seed(5)
    a = {f"l.{i}.w": torch.randn(3, 4) for i in range(3)} | {"head.w": torch.randn(2)}
    b = {f"b.{i}.w": a[f"l.{i}.w"].T.contiguous() if i == 1 else a[f"l.{i}.w"] for i in range(3)}
    b["out.w"] = a["head.w"]
    s = suggest_mapping(a, b)
    assert sorted(r.a[0] for r in s.mapping.rules) == ["head.w", "l.0.w", "l.1.w", "l.2.w"]
    assert diff(a, b, mapping=s.mapping).verdict == "identical"


def test_many_keys_stay_fast_and_templated() -> None:
    """~600 keys (100 layers): a few rules, not hundreds; no wall-clock assertion."""
    torch.manual_seed(6)
    a, b = {}, {}
    for i in range(100):
        q, k, v, o, up = (torch.randn(8, 8) for _ in range(5))
        a.update({f"h.{i}.attn.q.weight": q, f"h.{i}.attn.k.weight": k, f"h.{i}.attn.v.weight": v,
                  f"h.{i}.attn.o.weight": o, f"h.{i}.mlp.up.weight": up, f"h.{i}.ln.weight": torch.ones(8)})
        b.update({f"layers.{i}.qkv.weight": torch.cat([q, k, v]), f"layers.{i}.out.weight": o.T.contiguous(),
                  f"layers.{i}.fc.weight": up, f"layers.{i}.norm.weight": torch.ones(8)})
    s = suggest_mapping(a, b)
    assert s.complete and len(s.mapping.rules) == 4, s.to_yaml()
    assert diff(a, b, mapping=s.mapping).verdict == "identical"


def test_json_and_rendering() -> None:
    s = suggest_mapping(reference_model(), port_model())
    data = s.to_dict()
    assert data["schema"] == "tensorparity.suggest/1" and data["complete"] is True
    assert data["counts"] == {"identical": 27, "concat": 4}
    concat = next(p for p in data["pairs"] if p["method"] == "concat")
    assert concat["transform"] == {"concat": {"dim": 0}} and len(concat["a"]) == 3
    assert yaml.safe_load(data["yaml"])["rules"] == data["mapping"]["rules"]
    text = str(s)
    assert "31 pairs (27 identical bytes, 4 concatenated) in 10 rules" in text
    assert "layers.{i}.norm1.{p}" in text and "medium" in text


def test_progress_bar_and_open_checkpoints_left_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tensorparity

    path = tmp_path / "port.safetensors"
    save_file(from_reference(reference_model().state_dict()), str(path))
    port = tensorparity.open(path)
    with_bar = suggest_mapping(reference_model(), port, progress=True)
    assert with_bar.to_yaml().replace(str(path), "B") == suggest_mapping(reference_model(), port_model()).to_yaml(
        ).replace("<PortModel module>", "B")
    assert "matching by content" in capsys.readouterr().err
    assert port["blocks.0.qkv.weight"].load().shape == (96, 32)  # still readable: not closed by suggest
    port.close()


def test_bad_options_are_one_clear_error() -> None:
    with pytest.raises(UsageError) as err:
        suggest_mapping({}, {}, weights_only="yes")  # type: ignore[arg-type]
    assert "weights_only" in str(err.value) and "fix: e.g. suggest_mapping(a, b, weights_only=True)" in str(err.value)
