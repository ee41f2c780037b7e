"""SLA: Sparse-Linear Attention (thu-ml/SLA): exact softmax on critical blocks, linear attention on the rest.

q, k, v [B, M, H, d] are the M kept tokens in the order they arrive (raster order of the kept tokens).
Query block Q_i holds `block_q` consecutive tokens, key block K_j `block_k` (the last ones may be partial;
means and sums run over real tokens only). Per head:

    (1) select   s_ij = mean(Q_i) . mean(K_j - mean(K)),   sel(i) = top-k_j s_ij,
                 k = max(1, ceil((1 - sparsity) * KB))       (KB key blocks; not differentiable)
    (2) sparse   o_s,t = softmax(q_t K_sel(i)^T / sqrt(d)) V_sel(i)                    for t in Q_i
    (3) linear   S_j = phi(K_j)^T V_j,  z_j = sum_{u in K_j} phi(k_u)                  per key block, fp32
                 o_l,t = phi(q_t) (S - S_sel(i)) / (phi(q_t) (z - z_sel(i)) + eps)
                 S, z: sums over all blocks; S_sel(i), z_sel(i): over the selected ones
    (4) output   o = o_s + proj_l(o_l),   proj_l = Linear(d, d) shared by the heads, zero at init

phi is a softmax over head_dim (default), elu + 1, or relu, on the same (rotated) q and k as (2). The
complement sums in (3) are formed directly over the non-selected blocks (no cancellation); with every
block selected (sparsity 0) they are exactly zero, o_l = 0 and SLA is dense softmax attention.

Sparse-branch implementations: "reference" expands the selection into a [B, H, M, M] token mask for a
dense masked softmax (CPU and tests); "flex" turns it into a flex_attention BlockMask (selection_block_mask)
whose mask_mod looks each token pair's blocks up in the selection, compiled on CUDA, so no M x M tensor
exists. The linear branch is O(M d^2) in both. selection_block_mask is generic over the block sizes and
the VSA backend reuses it for its tiles.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from eflow.model.self_attention import SelfAttention
from eflow.model.tokens import TokenContext
from eflow.registry import hookimpl

FeatureMap = Literal["softmax", "elu", "relu"]
Impl = Literal["auto", "reference", "flex"]

# flex_attention's block on CUDA. Its H100 kernels tile 128 x 64 forward and 64 x 128 / 128 x 64 backward
# (bf16, head_dim 128), and a BlockMask's block must be a multiple of both: with (128, 64) blocks the
# forward runs but the backward finds no kernel config (NoValidChoicesError, torch 2.11). 128 on each side
# is what every dtype and head_dim accepts; logical blocks of other sizes are mapped onto it, and a flex
# block holding selected and unselected logical blocks is partial (its mask_mod runs on every element,
# ~2x the cost of a full block on an H100). So the default key block is 128 (SLA's own kernel uses 64):
# at 32,760 tokens fwd+bwd 30.0 ms against 52.6 ms with 64 (H100, bf16), the baseline's best kernel here.
FLEX_BLOCK = 128
LINEAR_EPS = 1e-6  # eps of the linear branch's normalizer


class SLAOptions(BaseModel):
    """Options of the sla attention backend."""

    model_config = ConfigDict(extra="forbid")

    block_q: int = Field(128, ge=1, le=8192, description="Tokens per query block (pooling and selection).")
    block_k: int = Field(
        128,
        ge=1,
        le=8192,
        description="Tokens per key block (pooling and selection); SLA's own kernel uses 64.",
    )
    sparsity: float = Field(
        0.8,
        ge=0.0,
        lt=1.0,
        description="Share of key blocks per query block left to the linear branch: top-k keeps "
        "ceil((1 - sparsity) * key blocks), at least 1. EFlow used 0.8 (0.95 diverged in their runs).",
    )
    feature_map: FeatureMap = Field(
        "softmax", description="phi of the linear branch: softmax over head_dim, elu (elu + 1), or relu."
    )
    impl: Impl = Field(
        "auto",
        description="Sparse branch: 'reference' (dense masked softmax, M x M), 'flex' (block-sparse "
        "flex_attention), 'auto' (flex on CUDA, reference on CPU). flex on CPU runs eagerly, forward only.",
    )


def topk_count(sparsity: float, num_blocks: int) -> int:
    """k = ceil((1 - sparsity) * num_blocks) in [1, num_blocks], rounded first (0.2 * 5 gives 1, not 2)."""
    return min(num_blocks, max(1, math.ceil(round((1.0 - sparsity) * num_blocks, 9))))


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 of x [B, M, ...] to `length`."""
    if length == x.shape[1]:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def block_mean(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive blocks of `block` tokens: x [B, M, H, d] -> [B, NB, H, d] (a partial last block
    is averaged over its real tokens)."""
    m = x.shape[1]
    nb = num_blocks(m, block)
    sums = pad_tokens(x, nb * block).unflatten(1, (nb, block)).sum(2)  # [B, NB, H, d]
    counts = (m - torch.arange(nb, device=x.device) * block).clamp(max=block)  # real tokens per block
    return sums / counts.to(x.dtype)[None, :, None, None]


@torch.no_grad()
def select_key_blocks(q: Tensor, k: Tensor, block_q: int, block_k: int, sparsity: float) -> Tensor:
    """(1): [B, H, QB, KB] bool, True where query block i keeps key block j for softmax (fp32 scores)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.to(dtype), k.to(dtype)
        pooled_q = block_mean(q, block_q)  # [B, QB, H, d]
        pooled_k = block_mean(k - k.mean(1, keepdim=True), block_k)  # [B, KB, H, d]
        scores = torch.einsum("bihd,bjhd->bhij", pooled_q, pooled_k)  # [B, H, QB, KB]
    top = scores.topk(topk_count(sparsity, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def token_mask(select: Tensor, block_q: int, block_k: int, m: int) -> Tensor:
    """Block selection [B, H, QB, KB] -> token mask [B, H, M, M], True where query t attends key u."""
    qi = torch.arange(m, device=select.device) // block_q
    kj = torch.arange(m, device=select.device) // block_k
    return select[:, :, qi][:, :, :, kj]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with a per-head mask [B, H, M, N] (True = may attend): [B, M, H, d]."""
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(q.shape[-1])  # [B, H, M, N]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhmn,bnhd->bmhd", weights, v)


def feature_map(x: Tensor, kind: FeatureMap) -> Tensor:
    """phi over the last dim: softmax, elu + 1, or relu."""
    if kind == "softmax":
        return x.softmax(dim=-1)
    if kind == "elu":
        return F.elu(x) + 1.0
    return F.relu(x)


def linear_branch(
    q: Tensor, k: Tensor, v: Tensor, select: Tensor, block_q: int, block_k: int, kind: FeatureMap
) -> Tensor:
    """(3) through per-block summaries, in fp32 (fp64 stays fp64): [B, M, H, d].

    S_j [B, H, KB, d, d] and z_j come from the key blocks; each query block sums those it did not select.
    """
    m = q.shape[1]
    qb, kb = select.shape[-2:]
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        fq, fk, v = feature_map(q.to(dtype), kind), feature_map(k.to(dtype), kind), v.to(dtype)
        fk = pad_tokens(fk, kb * block_k).unflatten(1, (kb, block_k))  # [B, KB, bk, H, d], padding is zero
        v = pad_tokens(v, kb * block_k).unflatten(1, (kb, block_k))
        summary = torch.einsum("bjuhd,bjuhe->bhjde", fk, v)  # S_j [B, H, KB, d, d]
        normalizer = fk.sum(2).transpose(1, 2)  # z_j [B, H, KB, d]
        rest = (~select).to(dtype)  # [B, H, QB, KB]: the blocks left to the linear branch
        summary_rest = torch.einsum("bhij,bhjde->bhide", rest, summary)  # [B, H, QB, d, d]
        normalizer_rest = torch.einsum("bhij,bhjd->bhid", rest, normalizer)  # [B, H, QB, d]
        fq = pad_tokens(fq, qb * block_q).unflatten(1, (qb, block_q))  # [B, QB, bq, H, d]
        num = torch.einsum("bithd,bhide->bithe", fq, summary_rest)
        den = torch.einsum("bithd,bhid->bith", fq, normalizer_rest)
        return (num / (den[..., None] + LINEAR_EPS)).flatten(1, 2)[:, :m]


def linear_branch_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, kind: FeatureMap) -> Tensor:
    """(3) written out over token pairs: weights phi(q_t) . phi(k_u) on the pairs NOT in mask [B, H, M, M]."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        fq, fk, v = feature_map(q.to(dtype), kind), feature_map(k.to(dtype), kind), v.to(dtype)
        weights = torch.einsum("bmhd,bnhd->bhmn", fq, fk) * ~mask  # [B, H, M, M]
        num = torch.einsum("bhmn,bnhd->bmhd", weights, v)
        return num / (weights.sum(-1).transpose(1, 2)[..., None] + LINEAR_EPS)


def _block_ranges(length: int, block: int, flex_block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last logical block (of `block` tokens) that each flex block over `length` tokens touches."""
    start = torch.arange(0, length, flex_block, device=device)
    end = (start + flex_block).clamp(max=length) - 1
    return start // block, end // block


def _block_table(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """[B, H, QB, KB] bool -> (num [B, H, QB] int32, indices [B, H, QB, KB] int32, listed blocks first)."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order


def selection_block_mask(
    select: Tensor,
    block_q: int,
    block_k: int,
    length: int,
    num_keys: int | None = None,
    kv_valid: Tensor | None = None,
    flex_block: int = FLEX_BLOCK,
) -> BlockMask:
    """BlockMask of a logical block selection [B, H, QB, KB] over sequences of `length` queries and keys.

    Query t may attend key u when select[b, h, t // block_q, u // block_k], u < num_keys (padding after it)
    and kv_valid[b, u] (when given). Query rows past the selection's last block take its last row, so
    padding rows always see a key. Callers pad `length` to a multiple of `flex_block`: flex's kernel is
    markedly slower on ragged lengths (32,760 tokens ~1.5x slower than 32,768, measured on an H100).

    The mask_mod looks the selection up per pair; the block tables, in flex blocks of `flex_block` tokens,
    come from 2D prefix sums of the selection (O(B H QB KB), never a token pair): a flex block is listed
    when it touches a selected logical block pair, and full (skipping the mask_mod) when every pair in it
    is selected and all its keys are real and valid.
    """
    b, h, qb, kb = select.shape
    device = select.device
    num_keys = length if num_keys is None else num_keys
    nb = num_blocks(length, flex_block)
    # Lookups padded so every index inside a flex block is in range (the kernel evaluates whole blocks).
    rows = torch.arange(num_blocks(nb * flex_block, block_q), device=device).clamp(max=qb - 1)
    sel_pad = torch.zeros(
        b, h, rows.shape[0], num_blocks(nb * flex_block, block_k), dtype=torch.bool, device=device
    )
    sel_pad[:, :, :, :kb] = select[:, :, rows]
    valid = (torch.arange(nb * flex_block, device=device) < num_keys).repeat(b, 1)  # [B, L'] real keys
    if kv_valid is not None:
        valid[:, :length] &= kv_valid
    key_limit = torch.tensor([num_keys], device=device)

    prefix = F.pad(sel_pad.to(torch.int32).cumsum(2).cumsum(3), (1, 0, 1, 0))  # [B, H, QB' + 1, KB' + 1]
    q_lo, q_hi = _block_ranges(length, block_q, flex_block, device)
    k_lo, k_hi = _block_ranges(length, block_k, flex_block, device)

    def corner(rows: Tensor, cols: Tensor) -> Tensor:
        return prefix[:, :, rows][:, :, :, cols]  # [B, H, nb, nb]

    selected = (
        corner(q_hi + 1, k_hi + 1) - corner(q_lo, k_hi + 1) - corner(q_hi + 1, k_lo) + corner(q_lo, k_lo)
    )
    pairs = (q_hi - q_lo + 1)[:, None] * (k_hi - k_lo + 1)[None, :]  # logical block pairs per flex block
    valid_keys = valid.reshape(b, nb, flex_block).sum(-1)[:, None, None, :]  # [B, 1, 1, nb]
    whole_q = ((torch.arange(nb, device=device) + 1) * flex_block <= length)[None, None, :, None]
    touched = (selected > 0) & (valid_keys > 0)
    full = (selected == pairs) & (valid_keys == flex_block) & whole_q

    if kv_valid is None:  # a bound, not a per-key load: the mask_mod runs on every element of partial blocks

        def selected_pair(b, h, q_idx, kv_idx):
            return sel_pad[b, h, q_idx // block_q, kv_idx // block_k] & (kv_idx < key_limit[0])

    else:

        def selected_pair(b, h, q_idx, kv_idx):
            return sel_pad[b, h, q_idx // block_q, kv_idx // block_k] & valid[b, kv_idx]

    kwargs = {}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (length, length)
    return BlockMask.from_kv_blocks(
        *_block_table(touched & ~full),
        *_block_table(full),
        BLOCK_SIZE=flex_block,
        mask_mod=selected_pair,
        **kwargs,
    )


def run_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, compiled: Callable) -> Tensor:
    """flex_attention on [B, H, L, d]: `compiled` on CUDA, eager on CPU (the test path, forward only)."""
    if q.is_cuda:
        return compiled(q, k, v, block_mask)
    with warnings.catch_warnings():  # eager flex on CPU is the test path; its unfused warning is moot
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


def _sla_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_sla_flex():
    """SLA's own compiled flex (its own code object, so its recompiles are counted apart from other backends';
    shapes vary per call, left to Dynamo's automatic dynamic marking)."""
    return torch.compile(_sla_flex, dynamic=None)


def sparse_branch_flex(q: Tensor, k: Tensor, v: Tensor, select: Tensor, block_q: int, block_k: int) -> Tensor:
    """(2) with block-sparse flex_attention over the selection [B, H, QB, KB]: [B, M, H, d]."""
    m = q.shape[1]
    length = num_blocks(m, FLEX_BLOCK) * FLEX_BLOCK  # padded: flex runs faster on whole blocks
    block_mask = selection_block_mask(select, block_q, block_k, length, num_keys=m)
    q, k, v = (pad_tokens(t, length).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    return run_flex(q, k, v, block_mask, _compiled_sla_flex()).transpose(1, 2)[:, :m]


class SparseLinearAttention(SelfAttention):
    """Block-sparse softmax on the top-k key blocks of each query block plus linear attention on the rest."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        block_q: int = 128,
        block_k: int = 128,
        sparsity: float = 0.8,
        feature_map: FeatureMap = "softmax",
        impl: Impl = "auto",
    ):
        super().__init__(dim, num_heads)
        opts = SLAOptions(
            block_q=block_q, block_k=block_k, sparsity=sparsity, feature_map=feature_map, impl=impl
        )
        self.block_q, self.block_k, self.sparsity = opts.block_q, opts.block_k, opts.sparsity
        self.feature_map, self.impl = opts.feature_map, opts.impl
        self.proj_l = nn.Linear(self.head_dim, self.head_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero proj_l: SLA starts as its sparse softmax (the model calls this after its own init)."""
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def resolved_impl(self, q: Tensor) -> str:
        return ("flex" if q.is_cuda else "reference") if self.impl == "auto" else self.impl

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        select = select_key_blocks(q, k, self.block_q, self.block_k, self.sparsity)  # [B, H, QB, KB]
        if self.resolved_impl(q) == "flex":
            o_sparse = sparse_branch_flex(q, k, v, select, self.block_q, self.block_k)
        else:
            o_sparse = masked_attention(q, k, v, token_mask(select, self.block_q, self.block_k, q.shape[1]))
        o_linear = linear_branch(q, k, v, select, self.block_q, self.block_k, self.feature_map)
        return o_sparse + self.proj_l(o_linear.to(v.dtype))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """(1)-(4) with explicit [B, H, M, M] masks: softmax on the selected pairs, linear on the others."""
        select = select_key_blocks(q, k, self.block_q, self.block_k, self.sparsity)
        mask = token_mask(select, self.block_q, self.block_k, q.shape[1])
        o_linear = linear_branch_reference(q, k, v, mask, self.feature_map)
        return masked_attention(q, k, v, mask) + self.proj_l(o_linear.to(v.dtype))

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """Selected pairs at 4 d each (selected key blocks counted as full), pooled scores, linear branch:
        S_j and phi(q) S at 2 M d^2 each, the complement sums 2 QB KB (d^2 + d), proj_l 2 M d^2."""
        h, d, m = self.num_heads, self.head_dim, ctx.index.shape[1]
        qb, kb = num_blocks(m, self.block_q), num_blocks(m, self.block_k)
        pairs = m * min(m, topk_count(self.sparsity, kb) * self.block_k)
        sparse = 4.0 * d * pairs
        scores = 2.0 * qb * kb * d
        linear = 6.0 * m * d * d + 2.0 * qb * kb * (d * d + d) + 2.0 * m * d
        return batch * h * (sparse + scores + linear)

    def kernel(self, q: Tensor) -> str:
        if self.resolved_impl(q) == "flex":
            sparse = "flex_attention block-sparse" + (" (compiled)" if q.is_cuda else " (eager)")
        else:
            sparse = "masked softmax with an M x M block mask"
        return f"{sparse} + fp32 block-summary linear"

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_q={self.block_q}, block_k={self.block_k}, "
            f"sparsity={self.sparsity}, feature_map={self.feature_map}, impl={self.impl}"
        )


@hookimpl
def register_attention(register):
    register(
        "sla",
        SparseLinearAttention,
        summary="Sparse-Linear Attention (thu-ml/SLA): top-k block softmax + linear attention on the rest.",
        options=SLAOptions,
    )
