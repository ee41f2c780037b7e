"""GLGA: Gated Local-Global Attention (EFlow 4.1).

Shared projections (see SelfAttention): Q = RoPE(RMSNorm(X W_q)), K = RoPE(RMSNorm(X W_k)), V = X W_v,
split into H heads of size d. n_i is the raster index of token i on the full (T', H', W') grid.

    (5) O_global = RMSNorm_d( Q (K^T V) )                        per head; K^T V is a d x d summary, in fp32
    (6) O_local,i = RMSNorm_d( softmax(q_i K_W(i)^T / sqrt(d)) V_W(i) ),
        W(i) = { kept j : |n_i - n_j| <= r },  r = (m H' W') // 2
    (7) [g_global, g_local] = sigmoid(X W_g),  W_g in R^{D x 2}  (R^{D x 2H} with gate_per_head)
    (8) O = g_global * O_global + g_local * O_local,  Y = O W_o

RMSNorm_d normalizes each head's d channels (weight of size d shared by the heads), so one head's
scale cannot squash the others. The window is defined on original raster indices: with dropped tokens
W(i) simply holds fewer keys, and the operation is otherwise unchanged. No convolutions anywhere.

Local-branch implementations: "reference" builds the M x M band mask and calls SDPA (fine on CPU);
"flex" runs flex_attention with a band mask_mod read through the raster indices and a block table built
from each block's index range (band_block_mask, once per forward); flex_attention (eflow.model.flex) is
compiled on CUDA, so no M x M tensor exists. On CUDA the gated GLGA runs as one compiled graph
(gated_glga), so the linear branch, the norms and the gate fuse around the band (fwd+bwd at 32,760
tokens 23.2 -> 20.3 ms on an H100; 15.96 ms on an H200 with the linear branch in bf16, the default).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from eflow.api import (
    HeadRows,
    RMSNorm,
    SelfAttention,
    TokenContext,
    dense_attention,
    flex,
    hookimpl,
    linear_attention_reference,
    window_mask,
)


class GLGAOptions(BaseModel):
    """Options of the glga attention backend."""

    model_config = ConfigDict(extra="forbid")

    window_frames: int = Field(
        4, ge=1, description="m: the local window spans m latent frames, |W| = m * H' * W' raster positions."
    )
    branches: Literal["gated", "sum", "linear", "window"] = Field(
        "gated",
        description="Table 3 ablation: gated sum (GLGA), plain sum, linear (global) only, window (local) only.",
    )
    gate_per_head: bool = Field(
        False, description="Gate each head separately: W_g is D x 2H instead of D x 2."
    )
    gate_fn: Literal["sigmoid", "softmax"] = Field(
        "sigmoid",
        description="Eq. (7)'s gate: 'sigmoid' (the paper: each branch in [0, 1], both can close) or "
        "'softmax' over the two branches (they sum to 1: one can close, not both; not the paper's).",
    )
    gate_init: Literal["xavier", "zero"] = Field(
        "xavier",
        description="W_g's init: 'xavier' (the model's linears; gates start spread over (0, 1)) or 'zero' "
        "(every gate starts at 0.5 and becomes input-aware as it trains). The paper does not say.",
    )
    impl: flex.Impl = Field(
        "auto",
        description="Local branch: 'reference' (dense masked SDPA), 'flex' (band flex_attention), "
        "'auto' (flex on CUDA, reference on CPU). flex on CPU runs eagerly, forward only (tests).",
    )
    linear_precision: Literal["fp32", "input"] = Field(
        "input",
        description="Global branch Q (K^T V): 'input' (in the inputs' dtype: bf16 matmuls with fp32 "
        "accumulation under bf16 autocast, a bf16 K^T V, relative error ~1e-2 against fp32; fp32 inputs "
        "stay fp32) or 'fp32' (q, k, v cast up, fp32 products: GLGA 1.24x slower at 32,760 tokens; trained "
        "at B, one seed: accuracy and loss equal, FVD 19.99 against the bf16 branch's 21.81; "
        "docs/benchmarks.md, docs/results.md).",
    )


def window_radius(grid: tuple[int, int, int], window_frames: int) -> int:
    """r = (m * H' * W') // 2: token i sees raster positions [n_i - r, n_i + r]."""
    return (window_frames * grid[1] * grid[2]) // 2


def window_pairs(index: Tensor, radius: int) -> int:
    """Number of (query, key) pairs with |n_i - n_j| <= radius over sorted raster indices [B, M], summed over B."""
    index = index.contiguous()
    lo = torch.searchsorted(index, index - radius, side="left")
    hi = torch.searchsorted(index, index + radius, side="right")
    return int((hi - lo).sum())


def linear_attention(q: Tensor, k: Tensor, v: Tensor, precision: str = "fp32") -> Tensor:
    """Denominator-free Q (K^T V) per head, [B, M, H, d] -> [B, M, H, d]: in fp32 (fp64 stays fp64), or
    with precision 'input' in q's dtype (bf16 in, bf16 out; the matmuls accumulate in fp32)."""
    dtype = torch.promote_types(q.dtype, torch.float32) if precision == "fp32" else q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        summary = torch.einsum("bmhd,bmhe->bhde", k, v)  # [B, H, d, d]
        return torch.einsum("bmhd,bhde->bmhe", q, summary)  # [B, M, H, d]


def local_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: Tensor, radius: int) -> Tensor:
    """Band softmax through an explicit [B, 1, M, M] mask on raster indices: [B, M, H, d]."""
    mask = (index[:, :, None] - index[:, None, :]).abs() <= radius  # [B, M, M]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)


def band_block_mask(
    index: Tensor, radius: int, block: int = flex.BLOCK, pad_inputs: bool = False
) -> BlockMask:
    """Block mask of |index[b, q] - index[b, kv]| <= radius for sorted raster indices [B, M].

    The block table is built from each block's smallest and largest raster index (O(B (M / block)^2),
    never M x M): a key block touches a query block when their index ranges come within `radius`, and
    is full when every pair does. GLGAttention builds it once per forward (TokenContext.cached).
    pad_inputs: q, k, v will be zero-padded to a multiple of `block` (padding is given a raster index farther
    than any radius, flex.FAR, so no real token sees it).
    """
    m = index.shape[1]
    padded, first, last = flex.block_ranges(index, block)  # [B, nb * block], [B, nb], [B, nb]
    q_lo, q_hi, k_lo, k_hi = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    touches = (k_hi >= q_lo - radius) & (k_lo <= q_hi + radius)  # [B, QB, KB]
    full = flex.clear_ragged((k_lo >= q_hi - radius) & (k_hi <= q_lo + radius), m, block)

    def band(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] - padded[b, kv_idx]).abs() <= radius

    length = padded.shape[1] if pad_inputs else m
    return flex.from_tables((touches & ~full)[:, None], full[:, None], band, length, block)


def local_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    radius: int,
    pad_to_block: bool | None = None,
    block_mask: BlockMask | None = None,
) -> Tensor:
    """Band softmax with flex_attention (compiled on CUDA, eager on CPU): [B, M, H, d].

    On CUDA (or with pad_to_block) the sequence is zero-padded to a multiple of 128 first (flex ran SLA's
    blocks ~1.5x slower on a ragged length, 32,760 vs 32,768 tokens on an H100); the band masks the padding.
    block_mask: band_block_mask(index, radius, pad_inputs=pad_to_block) when the caller holds it already.
    """
    m = q.shape[1]
    padded = q.is_cuda if pad_to_block is None else pad_to_block
    if block_mask is None:
        block_mask = band_block_mask(index, radius, pad_inputs=padded)
    length = flex.num_blocks(m, flex.BLOCK) * flex.BLOCK if padded else m
    q, k, v = (flex.pad_tokens(t, length).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    return flex.run(q, k, v, block_mask, "glga_band").transpose(1, 2)[:, :m]


def gated_glga(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor,
    block_mask: BlockMask,
    norm_global: Tensor,
    norm_local: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    linear_fp32: bool = True,
) -> Tensor:
    """Eqs. (5)-(8) in one function for the CUDA path, compiled as a whole so the linear branch, the
    two RMSNorms, the gate and the casts fuse around the flex band: [B, L, H, d]. linear_fp32=False:
    the linear branch's products in q's dtype (GLGAOptions.linear_precision = 'input').

    q, k, v [B, L, H, d] and x [B, L, D] are zero-padded to whole flex blocks (L = a multiple of 128);
    zero k and v rows add nothing to K^T V, the band hides them from real queries, and the caller drops
    the padded rows of the output.
    """
    d = q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        lq, lk, lv = (t.float() for t in (q, k, v)) if linear_fp32 else (q, k, v)
        summary = torch.einsum("bmhd,bmhe->bhde", lk, lv)  # [B, H, d, d]
        o_global = torch.einsum("bmhd,bhde->bmhe", lq, summary)  # (5)
        o_global = F.rms_norm(o_global.float(), (d,), norm_global.float(), 1e-6).to(v.dtype)
    o_local = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    o_local = F.rms_norm(o_local.transpose(1, 2), (d,), norm_local.to(o_local.dtype), 1e-6)  # (6)
    g = torch.sigmoid(F.linear(x, gate_weight, gate_bias)).unflatten(-1, (2, -1))[..., None]  # (7)
    return g[:, :, 0] * o_global + g[:, :, 1] * o_local  # (8)


@functools.cache
def _compiled_gated_glga():
    """gated_glga compiled once per process (shapes left to Dynamo's automatic dynamic marking)."""
    flex.raise_recompile_limit()
    return torch.compile(gated_glga, dynamic=None)


class GLGAttention(SelfAttention):
    """Gated sum of a global linear-attention branch and a local sliding-window softmax branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_frames: int = 4,
        branches: Literal["gated", "sum", "linear", "window"] = "gated",
        gate_per_head: bool = False,
        gate_fn: Literal["sigmoid", "softmax"] = "sigmoid",
        gate_init: Literal["xavier", "zero"] = "xavier",
        impl: flex.Impl = "auto",
        linear_precision: Literal["fp32", "input"] = "input",
    ):
        super().__init__(dim, num_heads)
        opts = GLGAOptions(
            window_frames=window_frames,
            branches=branches,
            gate_per_head=gate_per_head,
            gate_fn=gate_fn,
            gate_init=gate_init,
            impl=impl,
            linear_precision=linear_precision,
        )
        self.window_frames, self.branches, self.impl = opts.window_frames, opts.branches, opts.impl
        self.gate_fn, self.gate_init = opts.gate_fn, opts.gate_init
        self.linear_precision = opts.linear_precision
        self.use_global = opts.branches in ("gated", "sum", "linear")
        self.use_local = opts.branches in ("gated", "sum", "window")
        self.norm_global = RMSNorm(self.head_dim, eps=1e-6) if self.use_global else None
        self.norm_local = RMSNorm(self.head_dim, eps=1e-6) if self.use_local else None
        self.gate = (
            nn.Linear(dim, 2 * (num_heads if gate_per_head else 1)) if opts.branches == "gated" else None
        )
        self.gate_per_head = opts.gate_per_head and self.gate is not None

    def init_weights(self) -> None:
        """gate_init = 'zero': W_g = 0 and its bias 0, so g = 0.5 everywhere at the start (the model calls
        this after its xavier init of every linear)."""
        if self.gate is not None and self.gate_init == "zero":
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def for_heads(self, start: int, stop: int) -> GLGAttention:
        """Heads [start, stop) alone (sequence parallelism): a per-head gate keeps those heads' rows, laid
        out as (2, H); a shared gate and the per-head-dim norms serve any heads as they are."""
        if not self.gate_per_head:
            return self
        return self.with_modules(gate=HeadRows(self.gate, 2, self.num_heads, start, stop))

    def global_branch(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(5): RMSNorm(Q (K^T V)), the product in fp32 or the inputs' dtype (linear_precision), the norm
        in fp32: [B, M, H, d]."""
        o = linear_attention(q, k, v, self.linear_precision)
        return self.norm_global(o.to(torch.promote_types(o.dtype, torch.float32))).to(v.dtype)

    def band_mask(self, ctx: TokenContext, padded: bool) -> BlockMask:
        """band_block_mask of ctx's tokens, built once per forward and shared by every GLGA block."""
        radius = window_radius(ctx.grid, self.window_frames)
        return ctx.cached(
            ("glga_band", radius, padded), lambda: band_block_mask(ctx.index, radius, pad_inputs=padded)
        )

    def local_branch(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext) -> Tensor:
        """(6): RMSNorm(band softmax over original raster indices): [B, M, H, d]."""
        radius = window_radius(ctx.grid, self.window_frames)
        if flex.resolve_impl(self.impl, q) == "reference":
            return self.norm_local(local_attention_reference(q, k, v, ctx.index, radius))
        padded = q.is_cuda  # whole flex blocks on CUDA
        o = local_attention_flex(q, k, v, ctx.index, radius, padded, self.band_mask(ctx, padded))
        return self.norm_local(o)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        if self.branches == "linear":
            return self.global_branch(q, k, v)
        if self.branches == "window":
            return self.local_branch(q, k, v, ctx)
        fusable = self.branches == "gated" and self.gate_fn == "sigmoid"  # gated_glga has the sigmoid
        if fusable and q.is_cuda and flex.resolve_impl(self.impl, q) == "flex":
            return self.attend_fused(q, k, v, ctx, x)
        o_global, o_local = self.global_branch(q, k, v), self.local_branch(q, k, v, ctx)
        if self.branches == "sum":
            return o_global + o_local
        logits = self.gate(x).unflatten(-1, (2, -1))  # [B, M, 2, 1 or H]
        g = (torch.sigmoid(logits) if self.gate_fn == "sigmoid" else logits.softmax(dim=2))[..., None]
        return g[:, :, 0] * o_global + g[:, :, 1] * o_local  # (7), (8)

    def attend_fused(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """The gated GLGA on CUDA: pad to whole flex blocks, run the compiled gated_glga, drop the padding."""
        m = q.shape[1]
        length = flex.num_blocks(m, flex.BLOCK) * flex.BLOCK
        q, k, v, x = (flex.pad_tokens(t, length) for t in (q, k, v, x))  # [B, L, H, d], x [B, L, D]
        o = _compiled_gated_glga()(
            q,
            k,
            v,
            x,
            self.band_mask(ctx, padded=True),
            self.norm_global.weight,
            self.norm_local.weight,
            self.gate.weight,
            self.gate.bias,
            self.linear_precision == "fp32",
        )
        return o[:, :m]

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Eqs. (5)-(8) with explicit loops and an explicit M x M window mask (plain torch, any dtype)."""

        def rms(o: Tensor, weight: Tensor) -> Tensor:
            return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        o_global = o_local = 0
        if self.use_global:
            o_global = rms(linear_attention_reference(q, k, v), self.norm_global.weight)
        if self.use_local:
            mask = window_mask(ctx.index, window_radius(ctx.grid, self.window_frames))
            o_local = rms(dense_attention(q, k, v, mask), self.norm_local.weight)
        if self.branches != "gated":
            return o_global + o_local  # "sum"; "linear" / "window" have the other branch at 0
        logits = (x @ self.gate.weight.T + self.gate.bias).unflatten(-1, (2, -1))  # [B, M, 2, 1 or H]
        if self.gate_fn == "sigmoid":
            g = 1 / (1 + torch.exp(-logits))
        else:  # softmax over the two branches
            e = torch.exp(logits - logits.amax(dim=2, keepdim=True))
            g = e / e.sum(dim=2, keepdim=True)
        return g[:, :, 0, ..., None] * o_global + g[:, :, 1, ..., None] * o_local

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """Linear branch 4 M d^2 per head; band 4 d per (query, key in its window) per head; gate 4 M D."""
        h, d, m = self.num_heads, self.head_dim, ctx.index.shape[1]
        total = 0.0
        if self.use_global:
            total += 4.0 * batch * h * m * d * d
        if self.use_local:
            total += (
                4.0
                * h
                * d
                * window_pairs(ctx.index, window_radius(ctx.grid, self.window_frames))
                * (batch / ctx.index.shape[0])
            )
        if self.gate is not None:
            total += 2.0 * batch * m * self.dim * self.gate.out_features
        return total

    def kernel(self, q: Tensor) -> str:
        impl = flex.resolve_impl(self.impl, q)
        linear = f"{'fp32' if self.linear_precision == 'fp32' else str(q.dtype).removeprefix('torch.')} einsum Q(K^T V)"
        if self.branches == "gated" and q.is_cuda and impl == "flex" and self.gate_fn == "sigmoid":
            return f"one compiled graph: {linear} + flex_attention band + norms and gate"
        local = {
            "flex": "flex_attention band" + (" (compiled)" if q.is_cuda else " (eager)"),
            "reference": "SDPA with an M x M band mask",
        }[impl]
        parts = {"linear": [linear], "window": [local]}.get(self.branches, [linear, local])
        return " + ".join(parts)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window_frames={self.window_frames}, branches={self.branches}, "
            f"gate_fn={self.gate_fn}, impl={self.impl}"
        )


@hookimpl
def register_attention(register):
    register(
        "glga",
        GLGAttention,
        summary="Gated Local-Global Attention (EFlow): linear global + sliding-window softmax, gated; droppable.",
        options=GLGAOptions,
        hybrid=True,  # one full softmax block after every K GLGA blocks (EFlow 4.1)
    )
