"""A port of the reference model, as a re-implementation would write it: fused qkv projection,
other module names, the same function."""

from __future__ import annotations

import math

import torch
from torch import nn

from tensorparity.errors import UsageError
from tensorparity.examples.reference import ReferenceModel, reference_model

__all__ = ["BUGS", "PortModel", "from_reference", "port_model"]

# The subtle bugs port_model can inject, each in one layer, as ports really get them wrong.
BUGS = {
    "norm_eps": "blocks.1.mlp_norm uses LayerNorm eps=1e-3 instead of 1e-5",
    "gelu_tanh": "blocks.0 uses the tanh approximation of GELU instead of the exact one",
}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, gelu: str = "none") -> None:
        super().__init__()
        self.heads = heads
        self.gelu = gelu  # "tanh": the approximation some ports pick
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-1, -2)) / math.sqrt(d // h)).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.mlp_norm(x)), approximate=self.gelu))


class PortModel(nn.Module):
    """Same interface and function as :class:`ReferenceModel`."""

    def __init__(self, n_mels: int = 16, dim: int = 32, heads: int = 4, layers: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self.subsample = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.register_buffer("mean", torch.zeros(n_mels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.subsample(features - self.mean[None, :, None]).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a reference state dict to the port's names and layouts (the port's converter).

    Example:
        >>> sorted(from_reference(reference_model().state_dict()))[:2]
        ['blocks.0.attn_norm.bias', 'blocks.0.attn_norm.weight']
    """
    out = {
        "subsample.weight": state["pre_encode.weight"], "subsample.bias": state["pre_encode.bias"],
        "norm.weight": state["final_norm.weight"], "norm.bias": state["final_norm.bias"],
        "head.weight": state["decoder.weight"], "head.bias": state["decoder.bias"],
        "mean": state["feature_mean"],
    }
    i = 0
    while f"layers.{i}.norm1.weight" in state:
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn_norm.{kind}"] = state[src + f"norm1.{kind}"]
            out[dst + f"mlp_norm.{kind}"] = state[src + f"norm2.{kind}"]
            out[dst + f"qkv.{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"fc1.{kind}"] = state[src + f"ffn.0.{kind}"]
            out[dst + f"fc2.{kind}"] = state[src + f"ffn.2.{kind}"]
        i += 1
    return {k: v.clone() for k, v in out.items()}


def port_model(seed: int = 0, bug: str | None = None) -> PortModel:
    """The port, loaded with the reference's weights through :func:`from_reference`.

    Args:
        seed: the reference's seed (its weights).
        bug: ``None`` (the correct port) or one of :data:`BUGS`: ``"norm_eps"`` (LayerNorm eps
            1e-3 in ``blocks.1.mlp_norm``), ``"gelu_tanh"`` (tanh-approximate GELU in
            ``blocks.0``). The weights stay right; only what the port computes changes.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 16, 8)
        >>> torch.allclose(port_model()(x), reference_model()(x), atol=1e-5)
        True
        >>> port_model(bug="norm_eps").blocks[1].mlp_norm.eps
        0.001
    """
    if bug is not None and bug not in BUGS:
        raise UsageError(f"unknown bug {bug!r}", fix=f"pass one of {', '.join(sorted(BUGS))}, or None")
    reference: ReferenceModel = reference_model(seed)
    model = PortModel()
    model.load_state_dict(from_reference(reference.state_dict()))
    if bug == "norm_eps":
        model.blocks[1].mlp_norm.eps = 1e-3
    elif bug == "gelu_tanh":
        model.blocks[0].gelu = "tanh"
    return model.eval()
