"""A small vision transformer (Dosovitskiy et al. 2021) for 32x32 single-channel images.

Architecture, input (N, 1, 32, 32) -> output (N, 10) logits, d = 32 features, 4 heads of 8::

    patches   Conv2d(1 -> d, 8x8, stride 8), flatten, transpose    (N, 16, d): 16 tokens
              + a learned position embedding (16, d)
    2 x encoder layer (pre-norm):
              x = x + attention(LayerNorm(x))
              x = x + Linear(2d -> d)(GELU(Linear(d -> 2d)(LayerNorm(x))))
    attention Q, K, V = x W_q, x W_k, x W_v (one Linear(d -> 3d)), split into 4 heads;
              softmax(Q K^T / sqrt(8)) V per head, heads concatenated, Linear(d -> d)
    head      LayerNorm, mean over the 16 tokens, Linear(d -> 10)

Everything an implicit model needs beyond LeNet-5 is here: products of two variables (Q K^T and
P V), softmax (exponentials and a normalizing division), LayerNorm (a variance, a reciprocal
square root, a product) and GELU (erf). The attention is written out (not nn.MultiheadAttention)
so the exported graph is the textbook one with both torch exporters. 20,074 parameters.

This module is a torch definition only; ``zoo/export_transformer.py`` trains it on
scikit-learn's digits (upsampled to 32x32 by ``zoo/data.py``) and exports it.
"""

from __future__ import annotations

import torch
from torch import nn

DIM, HEADS, LAYERS, PATCH, IMAGE = 32, 4, 2, 8, 32
TOKENS = (IMAGE // PATCH) ** 2


class Attention(nn.Module):
    """Multi-head softmax self-attention over (N, S, d) tokens."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, S, head_dim)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        out = scores.softmax(dim=-1) @ v  # (N, heads, S, head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The vision transformer of the module docstring."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, DIM, kernel_size=PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, DIM))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.Sequential(*(EncoderLayer() for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position  # (N, 16, d)
        tokens = self.norm(self.layers(tokens))
        return self.head(tokens.mean(dim=1))
