"""The VideoDiT block (Wan 2.1 style): AdaLN-Zero self-attention, optional text cross-attention, FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eflow.model.feed_forward import FeedForward
from eflow.model.self_attention import RMSNorm
from eflow.model.tokens import TokenContext


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class CrossAttention(nn.Module):
    """Softmax cross-attention from video tokens to text tokens, plus one learned null key/value token.

    The null token is always attendable, so a fully masked text (the null condition) still has a key.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=1e-6)
        self.norm_k = RMSNorm(dim, eps=1e-6)
        self.null_kv = nn.Parameter(torch.randn(2, 1, dim) * 0.02)  # (key, value) of the null token

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b = x.shape[0]
        q = self.norm_q(self.q(x))  # [B, M, D]
        null_k, null_v = (t.expand(b, -1, -1) for t in self.null_kv)  # [B, 1, D] each
        k, v = self.k(text), self.v(text)  # [B, L, D]
        k = self.norm_k(torch.cat([k, null_k.to(k.dtype)], dim=1))  # [B, L + 1, D]
        v = torch.cat([v, null_v.to(v.dtype)], dim=1)  # [B, L + 1, D]
        mask = torch.cat([text_mask.bool(), text_mask.new_ones(b, 1, dtype=torch.bool)], dim=1)  # [B, L + 1]
        q, k, v = (
            t.to(q.dtype).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B, H, M, d]
        return self.proj(o.transpose(1, 2).flatten(2))  # [B, M, D]


class DiTBlock(nn.Module):
    """AdaLN-Zero block: modulated self-attention (a registry backend), text cross-attention, modulated FFN.

    The FFN is the backend's `feed_forward(dim, ffn_dim)` when it defines one (Sana's Mix-FFN), else the
    MLP; either is called as ffn(x, ctx).

    The modulation is the model's shared time projection [B, 6, D] plus this block's learned [1, 6, D]
    (Wan 2.1): (shift, scale, gate) for attention, then for the FFN. Gates start at zero.
    """

    def __init__(
        self, dim: int, ffn_dim: int, attn: nn.Module, num_heads: int, cross_attention: bool = False
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        make_ffn = getattr(attn, "feed_forward", None)  # SelfAttention defines it; other modules may not
        self.ffn = make_ffn(dim, ffn_dim) if make_ffn is not None else FeedForward(dim, ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        ctx: TokenContext,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, M, D], mod [B, 6, D], text [B, L, D] with text_mask [B, L] -> [B, M, D]."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation + mod).chunk(
            6, dim=1
        )  # [B, 1, D]
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), ctx)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        x = x + gate_f * self.ffn(modulate(self.norm2(x), shift_f, scale_f), ctx)
        return x


class FinalLayer(nn.Module):
    """Output head: LayerNorm -> AdaLN (shift, scale from c) -> Linear to patch values (zero-init)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, D] each
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, D] -> [B, N, out_dim]
