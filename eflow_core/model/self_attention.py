"""The shared frame of every self-attention backend: QKV, QK RMSNorm, heads, RoPE, output projection."""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod

import torch.nn.functional as F
from torch import Tensor, nn

from eflow.errors import EflowError
from eflow.model.feed_forward import FeedForward
from eflow.model.rope import apply_rope
from eflow.model.tokens import TokenContext


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm in the input's dtype (weight cast), so bf16 activations under autocast take the fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class HeadRows(nn.Module):
    """The rows of `linear` that belong to heads [start, stop), its outputs laid out as (groups, heads,
    width): Linear(D, groups * (stop - start) * width) on slices of its weight and bias, which gradients
    reach. GLGA's per-head gate is (2, H, 1), VSA's gate (1, H, d)."""

    def __init__(self, linear: nn.Linear, groups: int, heads: int, start: int, stop: int):
        super().__init__()
        if linear.out_features % (groups * heads):
            raise ValueError(f"{linear.out_features} outputs do not split into {groups} x {heads} heads")
        self.linear, self.groups, self.heads, self.start, self.stop = linear, groups, heads, start, stop

    def forward(self, x: Tensor) -> Tensor:
        weight = self.linear.weight.unflatten(0, (self.groups, self.heads, -1))  # [G, H, w, D]
        weight = weight[:, self.start : self.stop].flatten(0, 2)  # [G * h * w, D]
        bias = self.linear.bias
        if bias is not None:
            bias = bias.unflatten(0, (self.groups, self.heads, -1))[:, self.start : self.stop].flatten()
        return F.linear(x, weight, bias)


class SelfAttention(nn.Module, metaclass=ABCMeta):
    """Multi-head self-attention over the kept tokens; subclasses implement `attend`.

    forward(x, ctx): qkv = Linear(D, 3D)(x); RMSNorm over the full D of q and of k (Wan-style);
    split into H heads; RoPE on q and k; o = attend(q, k, v, ctx, x); y = Linear(D, D)(o).
    A backend that needs q, k before RoPE (Sana applies ReLU first) sets `rotate_qk = False`
    and calls `apply_rope(., ctx.rope)` itself.
    """

    rotate_qk: bool = True  # apply RoPE to q and k before `attend`

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim, eps=1e-6)
        self.norm_k = RMSNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    registered_as: str = ""  # "attention 'NAME' (plugin 'OWNER')", set by the model that builds it

    def forward(self, x: Tensor, ctx: TokenContext) -> Tensor:
        q, k, v = self.project(x, ctx)  # [B, M, H, d] each
        o = self.attend(q, k, v, ctx, x)  # [B, M, H, d]
        if o.shape != q.shape:
            who = self.registered_as or f"attention backend {type(self).__qualname__}"
            raise EflowError(
                f"{who}: attend() returned shape {tuple(o.shape)}, expected {tuple(q.shape)} "
                "([batch, tokens, heads, head_dim], like q)"
            )
        return self.proj(o.flatten(2))  # [B, M, D]

    def project(self, x: Tensor, ctx: TokenContext) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, M, D] -> q, k, v [B, M, H, d], QK-normed, q and k rotated when `rotate_qk`."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, M, D] each
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v))
        if self.rotate_qk:
            q, k = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
        return q, k, v

    @abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Mix values: q, k, v [B, M, H, d] (x [B, M, D] for gates) -> [B, M, H, d]. The backend's seam."""

    def for_heads(self, start: int, stop: int) -> SelfAttention:
        """The module whose `attend` serves heads [start, stop) alone: q, k, v carry those heads, x and ctx
        every token (Ulysses sequence parallelism calls it so, eflow.parallel.sequence).

        `self` fits a backend whose parameters all heads share; a backend with per-head parameters (a
        per-head gate) returns `self.with_modules(name=HeadRows(...))`, those parameters sliced.
        """
        return self

    def with_modules(self, **modules: nn.Module) -> SelfAttention:
        """A shallow copy of this module with the named submodules replaced; all else (parameters, the
        other submodules) is shared, and the copy belongs to no model (state dicts never see it)."""
        view = copy.copy(self)
        view._modules = {**self._modules, **modules}
        return view

    def flops(self, ctx: TokenContext, batch: int) -> float | None:
        """Forward FLOPs of `attend` for `batch` samples on ctx's M tokens (2 per multiply-add, matmuls only).

        None when the count is not defined for this backend (then benchmarks report no TF/s). Forward plus
        backward counts as 3.5x this (the convention of docs/benchmarks.md).
        """
        return None

    def kernel(self, q: Tensor) -> str:
        """Which kernel serves `attend` for inputs like q [B, M, H, d] on q's device (reported by benchmarks)."""
        return "eager torch ops"

    def feed_forward(self, dim: int, hidden: int) -> nn.Module:
        """The FFN of a block using this backend, called as ffn(x [B, M, D], ctx) -> [B, M, D].

        The default is the token-wise MLP; a backend whose method includes its own FFN (Sana's Mix-FFN)
        overrides this.
        """
        return FeedForward(dim, hidden)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
