"""Input embeddings of the VideoDiT: patches, scalar times, class labels, text; and unpatchify."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from eflow.condition import NULL_LABEL


class PatchEmbed3D(nn.Module):
    """Embeds non-overlapping (pt, ph, pw) patches of a video as tokens in raster order (t, h, w).

    A Conv3d with kernel = stride = patch (as in Wan 2.1), i.e. one Linear over each flattened patch.
    """

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, T, H, W] -> [B, T'H'W', D], laid out like every block's output (row-major), so a compiled
        # block sees one memory layout (a transposed view would be a second compiled variant)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """Tokens [B, N, pt*ph*pw*C] on grid (T', H', W') -> video [B, C, T'pt, H'ph, W'pw]."""
    t, h, w = grid
    pt, ph, pw = patch
    return rearrange(
        x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
    )


def sinusoidal_embedding(x: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """[B] scalars -> [B, dim] cos/sin features of scale * x (fp32), DiT's frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = scale * x.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Embeds a scalar in [0, 1] (a time, a gap t - s or a guidance scale) as a vector: sinusoid -> MLP.

    The caller passes the value as is (t in [0, 1], no x1000); the sinusoid multiplies it by `scale`
    (1000) internally, so DiT's frequencies (periods 2*pi .. 2*pi*1e4) resolve steps of 1e-3 in t.
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        emb = sinusoidal_embedding(x, self.freq_dim, self.scale)  # fp32 features, in the weights' dtype below
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # [B] -> [B, D]


class LabelEmbedder(nn.Module):
    """Embeds class labels; the null label (NULL_LABEL = -1) maps to an extra last row."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        idx = torch.where(labels == NULL_LABEL, torch.full_like(labels, self.num_classes), labels)
        return self.table(idx)  # [B] -> [B, D]


class TextProjection(nn.Module):
    """Projects text-encoder tokens to the model width (Wan 2.1): Linear -> GELU(tanh) -> Linear."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, text: Tensor) -> Tensor:
        return self.mlp(text)  # [B, L, Dt] -> [B, L, D]
