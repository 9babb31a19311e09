"""Real ports for the acceptance tests of issue #11 ("layer parity you can trust on real ports").

Pure builders, no tests. Each pair is two implementations of one model, written by different
people, B's weights converted from A's by a converter that is not ours:

- ``llama``: Hugging Face's ``LlamaForCausalLM`` (GQA, eager attention) against torchtune's Llama 3
  builder, converted by torchtune's own ``convert_weights.hf_to_tune`` (which permutes q/k rows:
  HF rotates halves, torchtune interleaves pairs; torchtune also shares one RoPE module between
  all layers and calls it twice per layer).
- ``gpt2``: Hugging Face's ``GPT2LMHeadModel`` (``Conv1D`` layers, weights ``[in, out]``, one fused
  ``c_attn``) against a plain re-implementation with ``nn.Linear`` everywhere, split q/k/v, its
  own LayerNorm, GELU (tanh) and attention, converted by :func:`gpt2_to_port` (transposes, splits).
- ``mha``: ``nn.MultiheadAttention`` (packed ``in_proj_weight``) in a small residual model, against
  the same model with separate q/k/v/o ``nn.Linear`` and its own attention, converted by
  :func:`mha_to_split` (splits the packed projection).
- ``shared_act``: a NeMo-Conformer-like stack of macaron feed-forward blocks in which ONE activation
  instance is shared by every feed-forward (so ``named_modules`` knows it only as
  ``layers.0.feed_forward1.activation``, called four times), against a re-implementation with one
  activation per feed-forward and other names, converted by :func:`shared_to_split`.

Every pair has bugs planted in B, each with the layer that must be blamed: ``layer_a`` (A's name:
``compare_traces(...).first_divergence.layer_a`` and the replay culprit's ``layer``) and
``module_b`` (B's module: the replay culprit's ``module``).

Module-level factories make each side capturable from another process by the real CLI, with
``PYTHONPATH=tests/trace``::

    tensorparity capture ports:hf_llama --input ports:lm_ids --loss ports:lm_loss --inputs -o A
    tensorparity capture ports:tune_llama --input ports:lm_ids --loss ports:lm_loss -o B
    tensorparity capture ports:tune_llama_bug_down_proj ...

Weights are the same in every process: A is built under a fixed seed, B is converted from it.
Heavy imports (transformers, torchtune) happen inside the builders, so importing this module
needs torch only.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 96, 12
LM_IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
LM_TARGETS = LM_IDS.roll(-1, dims=1)


# --------------------------------------------------------------------------------------------
# What a pair is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bug:
    """A bug planted in B, and the layer that must be blamed for it.

    Attributes:
        name: short id (also the CLI factory suffix: ``<factory_b>_bug_<name>``).
        planted: where and what, in words.
        layer_a: A's layer that must be the first divergence (``first_divergence.layer_a``, origin
            ``introduced``) and the replay culprit's ``layer``.
        module_b: B's module that replay must name (the culprit's ``module``).
        plant: mutates a correct ``model_b`` in place.
    """

    name: str
    planted: str
    layer_a: str
    module_b: str
    plant: Callable[[nn.Module], None]


@dataclass
class Pair:
    """Two implementations of one model, B's weights converted from A's by the port's converter."""

    name: str
    model_a: nn.Module
    model_b: nn.Module
    inputs: tuple[Any, ...]
    loss: Callable[[Any], torch.Tensor]
    bugs: tuple[Bug, ...]
    factory_a: str  # CLI factories, for ``tensorparity capture`` with PYTHONPATH=tests/trace
    factory_b: str
    input_factory: str
    loss_factory: str
    make_b: Callable[[], nn.Module] = field(repr=False, default=lambda: nn.Identity())

    def bug(self, name: str) -> Bug:
        return next(b for b in self.bugs if b.name == name)

    def buggy(self, name: str) -> nn.Module:
        """A fresh B with bug ``name`` planted (``model_b`` itself is left correct)."""
        model = self.make_b()
        self.bug(name).plant(model)
        return model

    def run(self, model: nn.Module) -> torch.Tensor:
        """One forward and backward pass, as the CLI runs it (``--loss``)."""
        loss = self.loss(model(*self.inputs))
        loss.backward()
        return loss


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a Hugging Face ``ModelOutput``, a tuple's first element, or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return logits_of(out[0])
    return out.logits  # type: ignore[no-any-return]


def lm_loss(out: Any) -> torch.Tensor:
    """Next-token cross entropy on the fixed ids (also the CLI's ``--loss ports:lm_loss``)."""
    logits = logits_of(out).float()
    return F.cross_entropy(logits.flatten(0, 1), LM_TARGETS.flatten())


def mean_square(out: Any) -> torch.Tensor:
    """``mean(out ** 2)`` (also the CLI's ``--loss ports:mean_square``)."""
    return logits_of(out).float().pow(2).mean()


def lm_ids() -> torch.Tensor:
    """The token ids both language-model pairs run on (CLI ``--input ports:lm_ids``)."""
    return LM_IDS.clone()


def _seeded_noise(shape: torch.Size, seed: int | str, scale: float) -> torch.Tensor:
    """Noise from its own generator: a name as seed gives every parameter its own content (two
    layers' norms must not hold equal tensors, or content cannot tell them apart)."""
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# 1. Hugging Face Llama <-> torchtune Llama 3 (converted by torchtune's hf_to_tune)
# --------------------------------------------------------------------------------------------

LLAMA = {"hidden": 48, "intermediate": 96, "layers": 2, "heads": 4, "kv_heads": 2, "eps": 1e-5,
         "rope_theta": 10000.0, "max_seq": 64}


def hf_llama() -> nn.Module:
    """Hugging Face's ``LlamaForCausalLM`` at tiny size, the same weights in every process."""
    import transformers

    c = LLAMA
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        max_position_embeddings=c["max_seq"], rms_norm_eps=c["eps"], rope_theta=c["rope_theta"],
        # A wider init than HF's 0.02, so that attention is far from uniform: RoPE (and so the
        # converter's q/k permutation) then matters to the logits.
        initializer_range=0.1, tie_word_embeddings=False, attn_implementation="eager", use_cache=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not all ones, so a norm bug is not hidden by a unit weight
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + _seeded_noise(p.shape, name, 0.1))
    return model


def _bare_tune_llama() -> nn.Module:
    from torchtune.models.llama3 import llama3

    c = LLAMA
    return llama3(vocab_size=VOCAB, num_layers=c["layers"], num_heads=c["heads"], num_kv_heads=c["kv_heads"],
                  embed_dim=c["hidden"], max_seq_len=c["max_seq"], intermediate_dim=c["intermediate"],
                  norm_eps=c["eps"], rope_base=int(c["rope_theta"]))


def tune_llama() -> nn.Module:
    """torchtune's Llama 3 holding the HF model's weights, converted by torchtune's ``hf_to_tune``."""
    from torchtune.models.convert_weights import hf_to_tune

    c = LLAMA
    state = hf_to_tune(hf_llama().state_dict(), num_heads=c["heads"], num_kv_heads=c["kv_heads"], dim=c["hidden"])
    model = _bare_tune_llama()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _tune_down_proj(model: nn.Module) -> None:
    w = model.layers[1].mlp.w2.weight  # type: ignore[index,union-attr]
    with torch.no_grad():
        w.add_(_seeded_noise(w.shape, 5, 0.05))


def _tune_norm_eps(model: nn.Module) -> None:
    model.layers[0].sa_norm.eps = 0.5  # type: ignore[index,union-attr]


LLAMA_BUGS = (
    Bug("down_proj", "torchtune layers.1.mlp.w2 (down projection) weight + N(0, 0.05) noise",
        "model.layers.1.mlp.down_proj", "layers.1.mlp.w2", _tune_down_proj),
    Bug("norm_eps", "torchtune layers.0.sa_norm RMSNorm eps 0.5 instead of 1e-5",
        "model.layers.0.input_layernorm", "layers.0.sa_norm", _tune_norm_eps),
)


def llama_pair() -> Pair:
    return Pair("llama", hf_llama(), tune_llama(), (lm_ids(),), lm_loss, LLAMA_BUGS, *CLI["llama"], make_b=tune_llama)


# --------------------------------------------------------------------------------------------
# 2. Hugging Face GPT-2 <-> a plain nn.Linear re-implementation with split q/k/v
# --------------------------------------------------------------------------------------------

GPT2 = {"embd": 48, "layers": 2, "heads": 4, "positions": 32, "eps": 1e-5}


def hf_gpt2() -> nn.Module:
    """Hugging Face's ``GPT2LMHeadModel`` at tiny size (tied head), the same weights in every process."""
    import transformers

    c = GPT2
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=c["positions"], n_embd=c["embd"], n_layer=c["layers"], n_head=c["heads"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=c["eps"], initializer_range=0.1,
        attn_implementation="eager", use_cache=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(12)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms that are not the identity, biases that are not zero (as trained ones)
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + _seeded_noise(p.shape, name, 0.1))
            elif name.endswith("bias"):
                p.copy_(_seeded_noise(p.shape, name, 0.1))
    return model


class LayerNorm(nn.Module):
    """The port's own LayerNorm."""

    def __init__(self, d: int, eps: float = GPT2["eps"]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class TanhGELU(nn.Module):
    """GPT-2's GELU, the tanh approximation, written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.scaled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2)
        if self.scaled:
            scores = scores / math.sqrt(d // self.heads)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class GPTMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, 4 * d)
        self.act: nn.Module = TanhGELU()
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp_norm = LayerNorm(d)
        self.mlp = GPTMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPTPort(nn.Module):
    """GPT-2 written again: ``nn.Linear`` (``[out, in]``), split q/k/v, other names, tied head."""

    def __init__(self) -> None:
        super().__init__()
        c = GPT2
        self.tok = nn.Embedding(VOCAB, c["embd"])
        self.pos = nn.Embedding(c["positions"], c["embd"])
        self.blocks = nn.ModuleList(GPTBlock(c["embd"], c["heads"]) for _ in range(c["layers"]))
        self.final_norm = LayerNorm(c["embd"])
        self.head = nn.Linear(c["embd"], VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def gpt2_to_port(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's converter, as a user writes it: rename, transpose ``Conv1D`` weights, split qkv."""
    out: dict[str, torch.Tensor] = {"tok.weight": hf["transformer.wte.weight"],
                                    "pos.weight": hf["transformer.wpe.weight"],
                                    "head.weight": hf["transformer.wte.weight"],
                                    "final_norm.weight": hf["transformer.ln_f.weight"],
                                    "final_norm.bias": hf["transformer.ln_f.bias"]}
    for i in range(GPT2["layers"]):
        h, p = f"transformer.h.{i}.", f"blocks.{i}."
        for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[p + b + ".weight"], out[p + b + ".bias"] = hf[h + a + ".weight"], hf[h + a + ".bias"]
        qkv_w = hf[h + "attn.c_attn.weight"].t()  # Conv1D: [in, 3d] -> [3d, in]
        qkv_b = hf[h + "attn.c_attn.bias"]
        for name, w, bias in zip("qkv", qkv_w.chunk(3, dim=0), qkv_b.chunk(3, dim=0)):
            out[p + f"attn.{name}.weight"], out[p + f"attn.{name}.bias"] = w.contiguous(), bias.contiguous()
        for a, b in (("attn.c_proj", "attn.out"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            out[p + b + ".weight"] = hf[h + a + ".weight"].t().contiguous()
            out[p + b + ".bias"] = hf[h + a + ".bias"]
    return out


def port_gpt2() -> nn.Module:
    """The GPT-2 port holding HF's weights, converted by :func:`gpt2_to_port`."""
    model = GPTPort()
    model.load_state_dict(gpt2_to_port(hf_gpt2().state_dict()), strict=True)
    return model.eval()


def _gpt2_no_scale(model: nn.Module) -> None:
    model.blocks[0].attn.scaled = False  # type: ignore[index,union-attr]


def _gpt2_ln_eps(model: nn.Module) -> None:
    model.blocks[1].mlp_norm.eps = 0.5  # type: ignore[index,union-attr]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: CLIP's GELU approximation, a classic mix-up with GPT-2's tanh one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _gpt2_quick_gelu(model: nn.Module) -> None:
    model.blocks[0].mlp.act = QuickGELU()  # type: ignore[index,union-attr]


def _gpt2_v_from_k(model: nn.Module) -> None:
    attn = model.blocks[1].attn  # type: ignore[index,union-attr]
    with torch.no_grad():
        attn.v.weight.copy_(attn.k.weight)
        attn.v.bias.copy_(attn.k.bias)


GPT2_BUGS = (
    Bug("attn_scale", "port blocks.0.attn: scores not divided by sqrt(head_dim)",
        "transformer.h.0.attn", "blocks.0.attn", _gpt2_no_scale),
    Bug("ln_eps", "port blocks.1.mlp_norm (HF ln_2 of block 1): eps 0.5 instead of 1e-5",
        "transformer.h.1.ln_2", "blocks.1.mlp_norm", _gpt2_ln_eps),
    # (exact GELU instead of tanh changes the logits by only 2e-4 relative: too close to call here)
    Bug("quick_gelu", "port blocks.0.mlp.act: QuickGELU x*sigmoid(1.702x) instead of the tanh GELU",
        "transformer.h.0.mlp.act", "blocks.0.mlp.act", _gpt2_quick_gelu),
    Bug("v_from_k", "port blocks.1.attn.v loaded with k's weight and bias (a converter slicing bug)",
        "transformer.h.1.attn.c_attn", "blocks.1.attn.v", _gpt2_v_from_k),
)


def gpt2_pair() -> Pair:
    return Pair("gpt2", hf_gpt2(), port_gpt2(), (lm_ids(),), lm_loss, GPT2_BUGS, *CLI["gpt2"], make_b=port_gpt2)


# --------------------------------------------------------------------------------------------
# 3. nn.MultiheadAttention (packed in_proj) <-> separate q/k/v/o Linears
# --------------------------------------------------------------------------------------------

MHA = {"d": 32, "heads": 4, "layers": 2, "out": 10, "batch": 2, "time": 10}
MHA_X = torch.randn(MHA["batch"], MHA["time"], MHA["d"], generator=torch.Generator().manual_seed(4))


class PackedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(MHA["d"])
        self.attn = nn.MultiheadAttention(MHA["d"], MHA["heads"], batch_first=True)
        self.ff = nn.Linear(MHA["d"], MHA["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(x)


class PackedModel(nn.Module):
    """Residual blocks around ``nn.MultiheadAttention`` (one packed ``in_proj_weight``), a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PackedLayer() for _ in range(MHA["layers"]))
        self.head = nn.Linear(MHA["d"], MHA["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class SplitAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        d = MHA["d"]
        self.heads = MHA["heads"]
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        return self.o((weights @ v).transpose(1, 2).reshape(b, t, d))


class SplitBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(MHA["d"])
        self.mixer = SplitAttention()
        self.fc = nn.Linear(MHA["d"], MHA["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln(x))
        return x + self.fc(x)


class SplitModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SplitBlock() for _ in range(MHA["layers"]))
        self.out = nn.Linear(MHA["d"], MHA["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def mha_packed() -> nn.Module:
    """The model with ``nn.MultiheadAttention``, the same weights in every process."""
    torch.manual_seed(13)
    model = PackedModel()
    with torch.no_grad():  # biases that are not zero (MHA initialises its in_proj_bias to 0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(_seeded_noise(p.shape, name, 0.1))
            elif "norm.weight" in name:
                p.copy_(1.0 + _seeded_noise(p.shape, name, 0.1))
    return model.eval()


def mha_to_split(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's converter: rename, split ``in_proj_weight``/``in_proj_bias`` into q, k, v."""
    out = {"out.weight": a["head.weight"], "out.bias": a["head.bias"]}
    for i in range(MHA["layers"]):
        s, p = f"layers.{i}.", f"blocks.{i}."
        for x in ("weight", "bias"):
            out[p + "ln." + x] = a[s + "norm." + x]
            out[p + "fc." + x] = a[s + "ff." + x]
            out[p + "mixer.o." + x] = a[s + "attn.out_proj." + x]
            for name, part in zip("qkv", a[s + "attn.in_proj_" + x].chunk(3, dim=0)):
                out[p + f"mixer.{name}.{x}"] = part.contiguous()
    return out


def mha_split() -> nn.Module:
    """The split-projection model holding :func:`mha_packed`'s weights."""
    model = SplitModel()
    model.load_state_dict(mha_to_split(mha_packed().state_dict()), strict=True)
    return model.eval()


def mha_input() -> torch.Tensor:
    """The input of the MHA pair (CLI ``--input ports:mha_input``)."""
    return MHA_X.clone()


def _mha_v_transposed(model: nn.Module) -> None:
    v = model.blocks[1].mixer.v  # type: ignore[index,union-attr]
    with torch.no_grad():
        v.weight.copy_(v.weight.t().clone())


MHA_BUGS = (
    Bug("v_transposed", "split blocks.1.mixer.v weight loaded transposed (A has no v module: its MHA is blamed)",
        "layers.1.attn", "blocks.1.mixer", _mha_v_transposed),
)


def mha_pair() -> Pair:
    return Pair("mha", mha_packed(), mha_split(), (mha_input(),), mean_square, MHA_BUGS, *CLI["mha"], make_b=mha_split)


# --------------------------------------------------------------------------------------------
# 4. One activation instance shared by every feed-forward <-> one activation per feed-forward
# --------------------------------------------------------------------------------------------

ACT = {"d_in": 12, "d": 32, "ff": 64, "layers": 2, "out": 8, "batch": 2, "time": 10}
ACT_X = torch.randn(ACT["batch"], ACT["time"], ACT["d_in"], generator=torch.Generator().manual_seed(5))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ConformerFeedForward(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.linear1 = nn.Linear(ACT["d"], ACT["ff"])
        self.activation = activation
        self.linear2 = nn.Linear(ACT["ff"], ACT["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(x)))


class MacaronLayer(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.norm_feed_forward1 = nn.LayerNorm(ACT["d"])
        self.feed_forward1 = ConformerFeedForward(activation)
        self.norm_feed_forward2 = nn.LayerNorm(ACT["d"])
        self.feed_forward2 = ConformerFeedForward(activation)
        self.norm_out = nn.LayerNorm(ACT["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class SharedActivationModel(nn.Module):
    """NeMo-Conformer-like: ONE ``Swish`` instance is every feed-forward's ``activation``."""

    def __init__(self) -> None:
        super().__init__()
        shared = Swish()
        self.pre_encode = nn.Linear(ACT["d_in"], ACT["d"])
        self.layers = nn.ModuleList(MacaronLayer(shared) for _ in range(ACT["layers"]))
        self.decoder = nn.Linear(ACT["d"], ACT["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_encode(x)
        for layer in self.layers:
            x = layer(x)
        return self.decoder(x)


class FFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(ACT["d"], ACT["ff"])
        self.act: nn.Module = nn.SiLU()
        self.down = nn.Linear(ACT["ff"], ACT["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class MacaronBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn_in_norm = nn.LayerNorm(ACT["d"])
        self.ffn_in = FFN()
        self.ffn_out_norm = nn.LayerNorm(ACT["d"])
        self.ffn_out = FFN()
        self.out_norm = nn.LayerNorm(ACT["d"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn_in(self.ffn_in_norm(x)) * 0.5
        x = x + self.ffn_out(self.ffn_out_norm(x)) * 0.5
        return self.out_norm(x)


class PerBlockActivationModel(nn.Module):
    """The re-implementation: its own ``nn.SiLU`` in every feed-forward, other names."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(ACT["d_in"], ACT["d"])
        self.blocks = nn.ModuleList(MacaronBlock() for _ in range(ACT["layers"]))
        self.proj_out = nn.Linear(ACT["d"], ACT["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def shared_act() -> nn.Module:
    """The shared-activation model, the same weights in every process."""
    torch.manual_seed(14)
    model = SharedActivationModel()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + _seeded_noise(p.shape, name, 0.1))
    return model.eval()


def shared_to_split(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The re-implementation's converter (a rename table)."""
    table = {"pre_encode": "proj_in", "decoder": "proj_out"}
    out = {}
    for key, value in a.items():
        module, _, leaf = key.rpartition(".")
        if module in table:
            out[f"{table[module]}.{leaf}"] = value
            continue
        parts = module.split(".")  # layers.{i}.<...>
        rest = ".".join(parts[2:])
        rest = {"norm_feed_forward1": "ffn_in_norm", "norm_feed_forward2": "ffn_out_norm", "norm_out": "out_norm",
                "feed_forward1.linear1": "ffn_in.up", "feed_forward1.linear2": "ffn_in.down",
                "feed_forward2.linear1": "ffn_out.up", "feed_forward2.linear2": "ffn_out.down"}[rest]
        out[f"blocks.{parts[1]}.{rest}.{leaf}"] = value
    return out


def split_act() -> nn.Module:
    """The per-block-activation re-implementation holding :func:`shared_act`'s weights."""
    model = PerBlockActivationModel()
    model.load_state_dict(shared_to_split(shared_act().state_dict()), strict=True)
    return model.eval()


def act_input() -> torch.Tensor:
    """The input of the shared-activation pair (CLI ``--input ports:act_input``)."""
    return ACT_X.clone()


def _act_gelu(model: nn.Module) -> None:
    model.blocks[1].ffn_in.act = nn.GELU()  # type: ignore[index,union-attr]


ACT_BUGS = (
    # A's call of the shared instance from layers.1.feed_forward1 is (today) recorded as the 3rd call
    # of "layers.0.feed_forward1.activation"; it must be named after its call site.
    Bug("act_gelu", "re-implementation blocks.1.ffn_in.act: GELU instead of SiLU",
        "layers.1.feed_forward1.activation", "blocks.1.ffn_in.act", _act_gelu),
)


def act_pair() -> Pair:
    return Pair("shared_act", shared_act(), split_act(), (act_input(),), mean_square, ACT_BUGS, *CLI["shared_act"],
                make_b=split_act)


# --------------------------------------------------------------------------------------------
# Registry and CLI bug factories
# --------------------------------------------------------------------------------------------

# The CLI's view of each pair: (factory A, factory B, --input, --loss), with PYTHONPATH=tests/trace.
CLI: dict[str, tuple[str, str, str, str]] = {
    "llama": ("ports:hf_llama", "ports:tune_llama", "ports:lm_ids", "ports:lm_loss"),
    "gpt2": ("ports:hf_gpt2", "ports:port_gpt2", "ports:lm_ids", "ports:lm_loss"),
    "mha": ("ports:mha_packed", "ports:mha_split", "ports:mha_input", "ports:mean_square"),
    "shared_act": ("ports:shared_act", "ports:split_act", "ports:act_input", "ports:mean_square"),
}
PAIRS: dict[str, Callable[[], Pair]] = {"llama": llama_pair, "gpt2": gpt2_pair, "mha": mha_pair,
                                        "shared_act": act_pair}
# What each pair imports (the tests skip a pair whose packages are missing).
REQUIRES: dict[str, tuple[str, ...]] = {"llama": ("transformers", "torchtune"), "gpt2": ("transformers",),
                                        "mha": (), "shared_act": ()}
BUGS: dict[str, tuple[Bug, ...]] = {"llama": LLAMA_BUGS, "gpt2": GPT2_BUGS, "mha": MHA_BUGS, "shared_act": ACT_BUGS}
_B_FACTORIES: dict[str, Callable[[], nn.Module]] = {"llama": tune_llama, "gpt2": port_gpt2, "mha": mha_split,
                                                    "shared_act": split_act}


def _bug_factory(make_b: Callable[[], nn.Module], bug: Bug) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        model = make_b()
        bug.plant(model)
        return model

    factory.__name__ = factory.__qualname__ = f"{make_b.__name__}_bug_{bug.name}"
    factory.__doc__ = f"{make_b.__name__} with a planted bug: {bug.planted}."
    return factory


for _pair, _bugs in BUGS.items():
    for _bug in _bugs:
        _f = _bug_factory(_B_FACTORIES[_pair], _bug)
        globals()[_f.__name__] = _f  # e.g. ports:tune_llama_bug_down_proj


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy (a model is run once per capture: gradients accumulate)."""
    return copy.deepcopy(model)
