"""Full softmax self-attention (the Wan 2.1 baseline) through SDPA, cuDNN first on CUDA; the option
`kernel` pins one SDPA backend instead (the baseline's best kernel is a measurement, not a guess)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from eflow.api import ConfigError, SelfAttention, TokenContext, dense_attention, hookimpl

# On H100, cuDNN ~590 TF/s vs flash ~350 (notes/gpu-anchors.md); math is the last resort (e.g. fp64).
CUDA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 bundled with PyTorch (CUDA; a CPU kernel too)
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # xformers' memory-efficient kernel, bundled (CUDA)
    "math": SDPBackend.MATH,  # plain matmul + softmax, any device and dtype
}
Kernel = Literal["auto", "cudnn", "flash", "efficient", "math"]
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


class SoftmaxOptions(BaseModel):
    """Options of the `softmax` backend (model.attention_options; `--set softmax.kernel=...` in bench)."""

    model_config = ConfigDict(extra="forbid")
    kernel: Kernel = Field(
        "auto",
        description="SDPA backend: 'auto' (CUDA: cuDNN > flash > efficient > math, the first that accepts "
        "the inputs; CPU: PyTorch's choice), or one of 'cudnn', 'flash', 'efficient', 'math' alone (an "
        "error names the inputs it cannot run).",
    )


def cuda_sdpa_backends():
    """Context preferring cuDNN > flash > efficient > math (older torch: enable them, default order)."""
    if _HAS_PRIORITY:
        return sdpa_kernel(CUDA_BACKENDS, set_priority=True)
    return sdpa_kernel(CUDA_BACKENDS)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, kernel: Kernel = "auto") -> Tensor:
    """SDPA on [B, M, H, d] tensors -> [B, M, H, d]: cuDNN first on CUDA, or the one `kernel` given."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
    if kernel == "auto":
        with cuda_sdpa_backends() if q.is_cuda else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
    if not kernel_accepts(kernel, q.shape[-1], q.dtype, str(q.device), attn_mask is not None):
        raise refused(kernel, q, attn_mask)  # checked before tracing reaches SDPA (compile)
    with sdpa_kernel([KERNELS[kernel]]):
        try:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        except RuntimeError as err:  # refused for these sizes (the probe used small ones)
            if not is_no_kernel_error(err):
                raise
            raise refused(kernel, q, attn_mask) from err
    return o.transpose(1, 2)  # [B, M, H, d]


_ACCEPTS: dict[tuple[str, int, torch.dtype, str, bool], bool] = {}  # kernel_accepts' answers


@torch.compiler.assume_constant_result  # run at trace time, its answer a constant of the graph (compile)
def kernel_accepts(kernel: str, head_dim: int, dtype: torch.dtype, device: str, masked: bool) -> bool:
    """Whether SDPA's `kernel` alone runs a small call of this head dim, dtype, device and masking
    (probed once per combination)."""
    key = (kernel, head_dim, dtype, device, masked)
    if key not in _ACCEPTS:
        q = torch.zeros(1, 1, 16, head_dim, dtype=dtype, device=device)
        mask = torch.ones(16, 16, dtype=torch.bool, device=device) if masked else None
        with sdpa_kernel([KERNELS[kernel]]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA's per-kernel reasons for refusing
            try:
                F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                _ACCEPTS[key] = True
            except RuntimeError as err:
                if not is_no_kernel_error(err):
                    raise
                _ACCEPTS[key] = False
    return _ACCEPTS[key]


def refused(kernel: str, q: Tensor, attn_mask: Tensor | None) -> ConfigError:
    """The error for a pinned kernel that cannot run q [B, H, M, d]: the option, the inputs, the choices."""
    return ConfigError(
        f"softmax option kernel = {kernel!r}: SDPA's {kernel} kernel cannot run these inputs "
        f"({q.device.type}, {str(q.dtype).removeprefix('torch.')}, head dim {q.shape[-1]}"
        f"{', with a mask' if attn_mask is not None else ''}); choices: auto (the first kernel that accepts "
        f"them), {', '.join(KERNELS)}"
    )


def is_no_kernel_error(err: RuntimeError) -> bool:
    """SDPA's refusal when no enabled backend accepts the inputs (its wording differs across torch)."""
    text = str(err).lower()
    return "no viable backend" in text or "no available kernel" in text


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

    def __init__(self, dim: int, num_heads: int, kernel: Kernel = "auto"):
        super().__init__(dim, num_heads)
        self.kernel_choice = SoftmaxOptions(kernel=kernel).kernel

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        return sdpa(q, k, v, kernel=self.kernel_choice)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Explicit softmax(q k^T / sqrt(d)) v over all kept tokens (plain torch, any dtype)."""
        return dense_attention(q, k, v)

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """QK^T and PV: 4 M^2 d per head."""
        m = ctx.index.shape[1]
        return 4.0 * batch * self.num_heads * m * m * self.head_dim

    def kernel(self, q: Tensor) -> str:
        if self.kernel_choice != "auto":
            return f"SDPA {self.kernel_choice} (the kernel option)"
        return sdpa_kernel_name(q)


@hookimpl
def register_attention(register):
    register(
        "softmax",
        SoftmaxAttention,
        summary="Full softmax attention (Wan 2.1 baseline): SDPA, cuDNN > flash > efficient on CUDA.",
        options=SoftmaxOptions,
        attend_reads_x=False,
    )
