"""3D rotary position embedding over the (t, h, w) token grid (Wan-style split of the head dim)."""

from __future__ import annotations

import torch
from torch import Tensor


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs per axis (t, h, w): h and w get a third of the pairs each, t the rest."""
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def rope_table(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """RoPE angles [N, head_dim // 2] for every token of the grid, in raster order."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    angles = []
    for size, pairs, pos_axis in zip(grid, axis_dims(head_dim), range(3), strict=True):
        freqs = theta ** (-torch.arange(pairs, dtype=torch.float64, device=device) / max(pairs, 1))
        pos = torch.arange(size, dtype=torch.float64, device=device)
        shape = [1, 1, 1, pairs]
        shape[pos_axis] = size
        ang = (pos[:, None] * freqs[None, :]).reshape(shape)
        angles.append(ang.expand(*grid, pairs))
    return torch.cat(angles, dim=-1).reshape(-1, head_dim // 2).float()


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, M, H, d] by angles [B, M, d // 2] (computed in fp32)."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))  # [B, M, H, d/2, 2]
    cos = angles.cos()[:, :, None, :]
    sin = angles.sin()[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(dtype)
