"""A 12-block conformer-style encoder (batch 4, 400 frames, d=256) for the trace benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.act = nn.SiLU()
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.norm(x))))


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int = 31) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.SiLU()
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.glu(self.pointwise1(self.norm(x).transpose(1, 2)))
        return self.pointwise2(self.act(self.bn(self.depthwise(y)))).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ff1 = FeedForward(d)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.conv = ConvModule(d)
        self.ff2 = FeedForward(d)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class Conformer(nn.Module):
    def __init__(self, n_mels: int = 80, d: int = 256, heads: int = 4, blocks: int = 12) -> None:
        super().__init__()
        self.pre_encode = nn.Linear(n_mels, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.head = nn.Linear(d, 128)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pre_encode(features)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def conformer() -> Conformer:
    torch.manual_seed(0)
    return Conformer().train()


def features() -> torch.Tensor:
    return torch.randn(4, 400, 80, generator=torch.Generator().manual_seed(1))
