"""Full softmax self-attention (the Wan 2.1 baseline) through SDPA, cuDNN first on CUDA."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from eflow.api import SelfAttention, TokenContext, dense_attention, hookimpl

# On H100, cuDNN ~590 TF/s vs flash ~350 (notes/gpu-anchors.md); math is the last resort (e.g. fp64).
CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


def cuda_sdpa_backends():
    """Context preferring cuDNN > flash > efficient > math (older torch: enable them, default order)."""
    if _HAS_PRIORITY:
        return sdpa_kernel(CUDA_BACKENDS, set_priority=True)
    return sdpa_kernel(CUDA_BACKENDS)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """SDPA on [B, M, H, d] tensors (cuDNN first on CUDA) -> [B, M, H, d]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
    with cuda_sdpa_backends() if q.is_cuda else contextlib.nullcontext():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return o.transpose(1, 2)  # [B, M, H, d]


@functools.cache
def _sdpa_backend_serving(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> str:
    """The first of CUDA_BACKENDS that accepts q, k, v of this [B, H, M, d] shape: what cuDNN-first SDPA runs."""
    q = torch.zeros(shape, dtype=dtype, device=device)
    for backend in CUDA_BACKENDS:
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            return f"SDPA {backend.name.lower()}"
        except RuntimeError:
            continue
    return "SDPA (no backend accepted the inputs)"


def sdpa_kernel_name(q: Tensor) -> str:
    """Which SDPA backend serves q [B, M, H, d] (probed once per shape on CUDA; CPU picks its own)."""
    if not q.is_cuda:
        return "SDPA (CPU)"
    _, m, h, d = q.shape
    return _sdpa_backend_serving((1, h, min(m, 256), d), q.dtype, str(q.device))


class SoftmaxAttention(SelfAttention):
    """Full softmax attention over the kept tokens; dropping needs no special care."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        return sdpa(q, k, v)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Explicit softmax(q k^T / sqrt(d)) v over all kept tokens (plain torch, any dtype)."""
        return dense_attention(q, k, v)

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """QK^T and PV: 4 M^2 d per head."""
        m = ctx.index.shape[1]
        return 4.0 * batch * self.num_heads * m * m * self.head_dim

    def kernel(self, q: Tensor) -> str:
        return sdpa_kernel_name(q)


@hookimpl
def register_attention(register):
    register(
        "softmax",
        SoftmaxAttention,
        summary="Full softmax attention (Wan 2.1 baseline): SDPA, cuDNN > flash > efficient on CUDA.",
        attend_reads_x=False,
    )
