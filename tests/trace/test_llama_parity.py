"""Acceptance: Hugging Face's own Llama against a straightforward re-implementation.

The port has other module names, a fused qkv projection, a fused gate/up projection, and its own
RMSNorm, RoPE and attention code. At tiny size the two compare as matching, forward and backward,
through a mapping and through automatic alignment by execution order; with each injected bug the
first divergence and the replay name the right layer; a trace captured in another process gives the
same report as the in-process compare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tensorparity.checkpoint.tracefolder.reader import Trace  # noqa: E402
from tensorparity.trace import capture, replay  # noqa: E402
from tensorparity.trace._compare import compare_traces  # noqa: E402

VOCAB, D, FF, LAYERS, HEADS, KV_HEADS, EPS = 64, 32, 64, 2, 4, 2, 1e-6
HEAD = D // HEADS

# HF keys (A) -> the port's keys (B), written the way a user would write it.
MAPPING = {
    "name": "hf-llama-to-port",
    "rules": [
        {"a": "model.embed_tokens.{p}", "b": "tok.{p}"},
        {"a": "model.layers.{i}.input_layernorm.{p}", "b": "blocks.{i}.attn_norm.{p}"},
        {"a": ["model.layers.{i}.self_attn.q_proj.{p}", "model.layers.{i}.self_attn.k_proj.{p}",
               "model.layers.{i}.self_attn.v_proj.{p}"],
         "b": "blocks.{i}.attn.qkv.{p}", "transform": {"concat": {"dim": 0}}},
        {"a": "model.layers.{i}.self_attn.o_proj.{p}", "b": "blocks.{i}.attn.out.{p}"},
        {"a": "model.layers.{i}.post_attention_layernorm.{p}", "b": "blocks.{i}.mlp_norm.{p}"},
        {"a": ["model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"],
         "b": "blocks.{i}.mlp.gate_up.{p}", "transform": {"concat": {"dim": 0}}},
        {"a": "model.layers.{i}.mlp.down_proj.{p}", "b": "blocks.{i}.mlp.down.{p}"},
        {"a": "model.norm.{p}", "b": "final_norm.{p}"},
        {"a": "lm_head.{p}", "b": "head.{p}"},
    ],
}


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding, half-split convention, on [batch, heads, time, head_dim]."""
    t = x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, HEAD, 2, dtype=torch.float32) / HEAD)
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, (HEADS + 2 * KV_HEADS) * HEAD, bias=False)
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=-1)
        q = rope(q.view(b, t, HEADS, HEAD).transpose(1, 2))
        k = rope(k.view(b, t, KV_HEADS, HEAD).transpose(1, 2)).repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.view(b, t, KV_HEADS, HEAD).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = (q @ k.transpose(-1, -2)) * HEAD ** -0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * FF, bias=False)
        self.act: nn.Module = nn.SiLU()
        self.down = nn.Linear(FF, D, bias=False)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(self.act(gate) * up))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(D)
        self.attn = Attention()
        self.mlp_norm = RMSNorm(D)
        self.mlp = MLP()
        self.attn_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.attn_norm(x))
        x = x + h if self.attn_residual else h
        return x + self.mlp(self.mlp_norm(x))


class PortLlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.final_norm = RMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def hf_model() -> nn.Module:
    """Hugging Face's Llama at tiny size, the same weights every call (also a CLI factory)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=EPS,
        tie_word_embeddings=False, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def port(bug: str | None = None) -> PortLlama:
    """The port holding the HF model's weights; ``bug`` breaks block 1."""
    hf = hf_model().state_dict()
    model = PortLlama().eval()
    with torch.no_grad():
        model.tok.weight.copy_(hf["model.embed_tokens.weight"])
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}."
            block.attn_norm.weight.copy_(hf[p + "input_layernorm.weight"])
            block.attn.qkv.weight.copy_(torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            block.attn.out.weight.copy_(hf[p + "self_attn.o_proj.weight"])
            block.mlp_norm.weight.copy_(hf[p + "post_attention_layernorm.weight"])
            block.mlp.gate_up.weight.copy_(torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
            block.mlp.down.weight.copy_(hf[p + "mlp.down_proj.weight"])
        model.final_norm.weight.copy_(hf["model.norm.weight"])
        model.head.weight.copy_(hf["lm_head.weight"])
        block = model.blocks[1]
        if bug == "eps":
            block.attn_norm.eps = 1e-1
        elif bug == "transposed":
            block.attn.out.weight.copy_(block.attn.out.weight.T.clone())
        elif bug == "residual":
            block.attn_residual = False
        elif bug == "activation":
            block.mlp.act = nn.GELU()
        elif bug == "dropout":
            block.mlp.drop.train()
    return model


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def ids() -> torch.Tensor:
    """The input (also a CLI input factory)."""
    return IDS.clone()


def loss(out: object) -> torch.Tensor:
    """The scalar both sides differentiate (also the CLI's ``--loss``)."""
    logits = out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]
    return logits.pow(2).mean()


def run(model: nn.Module) -> Trace:
    """Inputs are recorded on both sides, so that an error made between sub-layers (the missing
    residual) is pinned on the parent whose own code made it."""
    with capture(model, inputs=True) as trace:  # type: ignore[arg-type]
        loss(model(IDS)).backward()
    return trace


@pytest.fixture(scope="module")
def reference() -> Trace:
    return run(hf_model())


# Where each bug lives in the port, and its partner in HF's model.
CULPRITS = {
    "eps": ("model.layers.1.input_layernorm", "blocks.1.attn_norm"),
    "transposed": ("model.layers.1.self_attn.o_proj", "blocks.1.attn.out"),
    "residual": ("model.layers.1", "blocks.1"),
    "activation": ("model.layers.1.mlp.act_fn", "blocks.1.mlp.act"),
    "dropout": ("model.layers.1.mlp", "blocks.1.mlp"),
}


@pytest.mark.parametrize("align", ["mapping", "order"])
def test_the_port_matches_hf_llama_forward_and_backward(reference: Trace, align: str) -> None:
    report = compare_traces(reference, run(port()), mapping=MAPPING if align == "mapping" else None,
                            align=align)  # type: ignore[arg-type]
    assert report.verdict in ("identical", "close") and report.exit_code == 0, report.summary()
    assert report.first_divergence is None and not report.mismatched
    pairs = {x.layer_a: x.layer_b for x in report.layers}
    for i in range(LAYERS):
        assert pairs[f"model.layers.{i}.input_layernorm"] == f"blocks.{i}.attn_norm"
        assert pairs[f"model.layers.{i}.self_attn.o_proj"] == f"blocks.{i}.attn.out"
        assert pairs[f"model.layers.{i}.mlp.down_proj"] == f"blocks.{i}.mlp.down"
        assert pairs[f"model.layers.{i}"] == f"blocks.{i}"
        # Parameter-free modules no rule names are paired inside their mapped parents.
        assert pairs[f"model.layers.{i}.mlp.act_fn"] == f"blocks.{i}.mlp.act"
        assert pairs[f"model.layers.{i}.self_attn"] == f"blocks.{i}.attn"
    assert pairs["<model>"] == "<model>" and pairs["model.norm"] == "final_norm"
    n = len(report.layers)
    assert report.forward_rate == (n, n) and report.backward_rate == (n, n)
    only_a = {x.layer: x.reason for x in report.only_a}
    if align == "mapping":
        # The fused qkv and gate/up projections compare with A's parts concatenated (the layout
        # derived from the rule's concat), and every parameter gradient has its partner.
        assert n == 24
        for i in range(LAYERS):
            qkv = " + ".join(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv")
            assert pairs[qkv] == f"blocks.{i}.attn.qkv"
            assert pairs[f"model.layers.{i}.mlp.gate_proj + model.layers.{i}.mlp.up_proj"] == f"blocks.{i}.mlp.gate_up"
        layer = next(x for x in report.layers if x.layer_b == "blocks.0.attn.qkv")
        assert layer.layout == "A's 3 outputs concatenated (rules[2]: concat along dim 0)"
        assert report.params_rate == (15, 15)
    else:
        # By order, q/k/v and gate/up have no single partner: listed with the reason, not dropped.
        assert n == 20
        assert {f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qkv"} <= only_a.keys()


@pytest.mark.parametrize("bug", list(CULPRITS))
@pytest.mark.parametrize("align", ["mapping", "order"])
def test_each_injected_bug_is_the_first_divergence(reference: Trace, bug: str, align: str) -> None:
    report = compare_traces(reference, run(port(bug)), mapping=MAPPING if align == "mapping" else None,
                            align=align)  # type: ignore[arg-type]
    first = report.first_divergence
    assert first is not None, report.summary()
    assert (first.layer_a, first.layer_b) == CULPRITS[bug], str(report)
    assert first.direction == "forward" and first.origin == "introduced"
    assert report.exit_code == 1
    # Everything that ran before it (outside it) matches; every other mismatch inherited from it.
    inside = first.layer_a + "."
    assert all(x.forward_passed for x in report.layers if x.order < first.order and not x.layer_a.startswith(inside))
    assert all(x.origin == "inherited" for x in report.mismatched if x is not first)


@pytest.mark.parametrize("bug", list(CULPRITS))
def test_replay_names_the_buggy_layer_alone(reference: Trace, bug: str) -> None:
    report = replay(reference, port(bug), mapping=MAPPING)
    culprits = [x.module for x in report.culprits]
    assert culprits == [CULPRITS[bug][1]], report.summary()
    assert report.exit_code == 1


def test_replay_of_the_correct_port_matches(reference: Trace) -> None:
    report = replay(reference, port(), mapping=MAPPING)
    assert report.exit_code == 0 and not report.culprits, report.summary()


def test_a_trace_from_another_process_gives_the_in_process_report(reference: Trace, tmp_path: Path) -> None:
    here = Path(__file__)
    saved = tmp_path / "hf-trace"
    done = subprocess.run(
        [sys.executable, "-m", "tensorparity", "capture", f"{here}:hf_model", "--input", f"{here}:ids",
         "--loss", f"{here}:loss", "--inputs", "-o", str(saved)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    buggy = run(port("eps"))
    in_process = compare_traces(reference, buggy, mapping=MAPPING).to_dict()
    across = compare_traces(Trace.open(saved), buggy, mapping=MAPPING).to_dict()
    for report in (in_process, across):
        report.pop("a", None)
        report.pop("provenance", None)
    assert json.dumps(across["layers"], sort_keys=True) == json.dumps(in_process["layers"], sort_keys=True)
    assert across["first_divergence"] == in_process["first_divergence"]


@pytest.mark.parametrize("bug", ["eps", "transposed"])
def test_a_live_port_is_run_on_the_reference_input_and_gives_the_traced_report(reference: Trace, bug: str) -> None:
    """The live side runs on the input the reference recorded and back-propagates the reference's
    recorded output gradient, so the loss need not be known; the user's gradients are untouched."""
    model = port(bug)
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    live = compare_traces(reference, model, mapping=MAPPING)
    traced = compare_traces(reference, run(port(bug)), mapping=MAPPING)
    assert live.first_divergence is not None and traced.first_divergence is not None
    assert (live.first_divergence.layer_a, live.first_divergence.layer_b) == CULPRITS[bug]
    # Forward is the same run; backward starts from the reference's output gradient, not from
    # the port's own (a buggy port's differs), so the head's gradients now match the reference's.
    assert [(x.layer_a, x.to_dict()["forward"]) for x in live.layers] == \
        [(x.layer_a, x.to_dict()["forward"]) for x in traced.layers]
    assert {x.layer_a: x.backward_passed for x in live.layers}["<model>"] is True
    assert bool((model.head.weight.grad == 7.0).all()) and model.training is False


def test_two_live_models_through_the_public_verb() -> None:
    import tensorparity

    same = tensorparity.compare(hf_model(), port(), mapping=MAPPING, inputs=IDS)
    assert same.exit_code == 0 and same.params_rate == (15, 15), same.summary()
    broken = tensorparity.compare(hf_model(), port("activation"), mapping=MAPPING, inputs=IDS)
    assert broken.first_divergence is not None and broken.first_divergence.layer_b == "blocks.1.mlp.act"
    with pytest.raises(tensorparity.TensorParityError, match="two live models need an input"):
        tensorparity.compare(hf_model(), port())
