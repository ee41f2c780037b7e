"""Readable CPU ground truth for attention backends: explicit softmax, window masks, linear attention.

Plain torch ops only (no SDPA, no flex), so tests can run them in float64. Layout: [B, M, H, d].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head; mask [B or 1, M, N] bool, True = may attend."""
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(q.shape[-1])  # [B, H, M, N]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhmn,bnhd->bmhd", weights, v)  # [B, M, H, d]


def window_mask(index: Tensor, radius: int) -> Tensor:
    """[B, M] raster indices -> [B, M, M] bool: |index_i - index_j| <= radius (on original positions)."""
    return (index[:, :, None] - index[:, None, :]).abs() <= radius


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Denominator-free linear attention Q (K^T V) per head, computed naively: [B, M, H, d]."""
    out = q.new_empty(*q.shape[:3], v.shape[-1])  # [B, M, H, d_v]
    for bi in range(q.shape[0]):
        for hi in range(q.shape[2]):
            summary = k[bi, :, hi].T @ v[bi, :, hi]  # [d, d]
            out[bi, :, hi] = q[bi, :, hi] @ summary  # [M, d]
    return out
