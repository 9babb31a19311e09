"""The reference implementation: a small speech-encoder-shaped model (conv front end, two
transformer layers, a classifier head)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ReferenceModel", "reference_model"]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        y = att.softmax(-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ReferenceModel(nn.Module):
    """Features ``(batch, n_mels, time)`` -> logits ``(batch, time/2, n_classes)``."""

    def __init__(self, n_mels: int = 16, dim: int = 32, heads: int = 4, layers: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self.pre_encode = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, n_classes)
        self.register_buffer("feature_mean", torch.zeros(n_mels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pre_encode(features - self.feature_mean[None, :, None]).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.decoder(self.final_norm(x))


def reference_model(seed: int = 0) -> ReferenceModel:
    """The reference model with deterministic weights (a ``module:function`` factory).

    Example:
        >>> sum(p.numel() for p in reference_model().parameters())
        27370
    """
    torch.manual_seed(seed)
    model = ReferenceModel()
    with torch.no_grad():
        model.feature_mean.copy_(torch.linspace(-0.5, 0.5, model.feature_mean.numel()))
    return model.eval()
