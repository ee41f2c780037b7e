"""Sana / Sana-Video: ReLU linear attention with RoPE on the numerator, and the convolutional Mix-FFN.

Shared projections (see SelfAttention) without the rotation: q, k = RMSNorm(X W_q), RMSNorm(X W_k), per
head of size d; R(.) is RoPE at each token's grid position (apply_rope with ctx.rope). Per head:

    phi(u) = ReLU(u)
    o_i = ( R(phi(q_i)) sum_j R(phi(k_j))^T v_j ) / ( phi(q_i) . sum_j phi(k_j) + eps )

The numerator uses the rotated features, the denominator the un-rotated ones (Sana-Video), so with zero
angles every row of the implied attention matrix sums to 1 (up to eps). Both sums run over the kept
tokens; cost is O(M d^2) per head through the d x d summary, never M x M. Everything is computed in
fp32 with autocast off (Sana's code: needed against NaN losses; fp64 stays fp64), then cast back;
compiled with torch.compile on CUDA, eager on CPU.

The block's FFN is Mix-FFN (eflow.model.mix_ffn): pointwise to 2h, SiLU, depthwise 3x3 per frame,
GLU, pointwise back, plus a zero-init residual temporal conv. Its convolutions need the dense grid, so
with dropped tokens dropped places hold zeros in them: the honest cost of dropping tokens in Sana.

Hidden width: h = the block's ffn_dim (4D in the presets) unless mlp_ratio sets h = mlp_ratio * D (Sana's
own is 2.5). With h = ffn_dim, XL has about 607M parameters, as in EFlow Table 2 (softmax: 457M): the
GLU's 2h-wide first layer adds 4 D^2 per block over the MLP.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from eflow.api import MixFFN, SelfAttention, TokenContext, apply_rope, hookimpl


class SanaOptions(BaseModel):
    """Options of the sana attention backend (and of its Mix-FFN)."""

    model_config = ConfigDict(extra="forbid")

    eps: float = Field(
        1e-8, gt=0, description="Added to the linear-attention denominator (Sana-Video: 1e-8)."
    )
    temporal_conv: Literal["depthwise", "full", "none"] = Field(
        "depthwise",
        description="Mix-FFN's residual temporal conv: 'depthwise' (k_t D weights), 'full' (k_t D^2, mixes "
        "channels) or 'none' (image Sana).",
    )
    spatial_kernel: int = Field(
        3, ge=1, description="Depthwise spatial kernel k_s (odd): 1 x k_s x k_s per frame."
    )
    temporal_kernel: int = Field(3, ge=1, description="Temporal kernel k_t (odd): k_t x 1 x 1.")
    mlp_ratio: float | None = Field(
        None,
        gt=0,
        description="Mix-FFN hidden width h = mlp_ratio * D; None takes the block's ffn_dim (Table 2's "
        "607M at XL). Sana's own models use 2.5.",
    )

    @field_validator("spatial_kernel", "temporal_kernel")
    @classmethod
    def _odd(cls, size: int) -> int:
        if size % 2 == 0:
            raise ValueError(f"must be odd so the conv keeps the grid size, got {size}")
        return size


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, angles: Tensor, eps: float) -> Tensor:
    """Sana-Video attention on un-rotated q, k, v [B, M, H, d], angles [B, M, d/2] -> [B, M, H, d] in fp32.

    Batched einsums through the [B, H, d, d] summary and the [B, H, d] key sum; autocast off.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        phi_q, phi_k = torch.relu(q), torch.relu(k)
        rot_q, rot_k = apply_rope(phi_q, angles), apply_rope(phi_k, angles)
        summary = torch.einsum("bmhd,bmhe->bhde", rot_k, v)  # [B, H, d, d]
        numerator = torch.einsum("bmhd,bhde->bmhe", rot_q, summary)  # [B, M, H, d]
        denominator = torch.einsum("bmhd,bhd->bmh", phi_q, phi_k.sum(dim=1))  # [B, M, H]
        return numerator / (denominator[..., None] + eps)


@functools.cache
def _compiled_relu_linear_attention():
    """relu_linear_attention compiled once per process (CUDA): Inductor fuses ReLU, RoPE and the casts
    around the einsums (on an H100 at 32,760 tokens, 12 x 128: 6.2 ms fwd+bwd against 13.3 eager)."""
    return torch.compile(relu_linear_attention, dynamic=None)


class SanaAttention(SelfAttention):
    """ReLU linear attention (RoPE on the numerator only) whose blocks use Mix-FFN."""

    rotate_qk = False  # ReLU comes before RoPE: attend rotates phi(q), phi(k) itself

    def __init__(
        self,
        dim: int,
        num_heads: int,
        eps: float = 1e-8,
        temporal_conv: Literal["depthwise", "full", "none"] = "depthwise",
        spatial_kernel: int = 3,
        temporal_kernel: int = 3,
        mlp_ratio: float | None = None,
    ):
        super().__init__(dim, num_heads)
        self.options = SanaOptions(
            eps=eps,
            temporal_conv=temporal_conv,
            spatial_kernel=spatial_kernel,
            temporal_kernel=temporal_kernel,
            mlp_ratio=mlp_ratio,
        )
        self.eps = self.options.eps

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        run = _compiled_relu_linear_attention() if q.is_cuda else relu_linear_attention
        return run(q, k, v, ctx.rope, self.eps).to(v.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """The explicit [M, M] attention matrix per sample and head, normalizer written out: [B, M, H, d]."""
        rot_q, rot_k = apply_rope(torch.relu(q), ctx.rope), apply_rope(torch.relu(k), ctx.rope)
        out = torch.empty_like(v)
        for bi in range(q.shape[0]):
            for hi in range(q.shape[2]):
                phi_q, phi_k = torch.relu(q[bi, :, hi]), torch.relu(k[bi, :, hi])  # [M, d]
                weights = rot_q[bi, :, hi] @ rot_k[bi, :, hi].T  # [M, M]
                normalizer = phi_q @ phi_k.sum(dim=0) + self.eps  # [M]
                out[bi, :, hi] = (weights / normalizer[:, None]) @ v[bi, :, hi]
        return out

    def feed_forward(self, dim: int, hidden: int) -> nn.Module:
        """Mix-FFN with h = hidden (the block's ffn_dim) or mlp_ratio * dim."""
        opts = self.options
        width = hidden if opts.mlp_ratio is None else max(1, round(opts.mlp_ratio * dim))
        return MixFFN(
            dim,
            width,
            spatial_kernel=opts.spatial_kernel,
            temporal_kernel=opts.temporal_kernel,
            temporal_conv=opts.temporal_conv,
        )

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """Summary K^T V and Q S: 4 M d^2 per head; normalizer K^T 1 and q . z: 4 M d per head."""
        m, d = ctx.index.shape[1], self.head_dim
        return batch * self.num_heads * (4.0 * m * d * d + 4.0 * m * d)

    def kernel(self, q: Tensor) -> str:
        compiled = " (compiled)" if q.is_cuda else ""
        return (
            f"fp32 einsum ReLU linear attention{compiled} (RoPE numerator); Mix-FFN convs on the dense grid"
        )

    def extra_repr(self) -> str:
        o = self.options
        return f"{super().extra_repr()}, eps={o.eps:g}, temporal_conv={o.temporal_conv}"


@hookimpl
def register_attention(register):
    register(
        "sana",
        SanaAttention,
        summary="Sana-Video: ReLU linear attention (RoPE numerator) + conv Mix-FFN; dropped tokens are zeros in its convs.",
        options=SanaOptions,
        attend_reads_x=False,
    )
