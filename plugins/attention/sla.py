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
dense masked softmax (CPU and tests); "flex" turns it into a flex_attention BlockMask (selection_block_mask
of eflow.model.block_sparse, which VSA uses for its tiles too) whose mask_mod looks each token pair's
blocks up in the selection, compiled on CUDA, so no M x M tensor exists. The linear branch is O(M d^2) in
both.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.api import (
    SelfAttention,
    TokenContext,
    flex,
    hookimpl,
    masked_attention,
    num_blocks,
    pad_tokens,
    selection_block_mask,
    topk_count,
)

FeatureMap = Literal["softmax", "elu", "relu"]
LINEAR_EPS = 1e-6  # eps of the linear branch's normalizer


class SLAOptions(BaseModel):
    """Options of the sla attention backend."""

    model_config = ConfigDict(extra="forbid")

    block_q: int = Field(128, ge=1, le=8192, description="Tokens per query block (pooling and selection).")
    # Logical blocks of any size are mapped onto flex's 128-token blocks (flex.BLOCK), and a flex block
    # holding selected and unselected logical blocks is partial (its mask_mod runs on every element, ~2x
    # the cost of a full block on an H100). So the default key block is 128 (SLA's own kernel uses 64): at
    # 32,760 tokens fwd+bwd 30.0 ms against 52.6 ms with 64 (H100, bf16), the baseline's best kernel here.
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
    impl: flex.Impl = Field(
        "auto",
        description="Sparse branch: 'reference' (dense masked softmax, M x M), 'flex' (block-sparse "
        "flex_attention), 'auto' (flex on CUDA, reference on CPU). flex on CPU runs eagerly, forward only.",
    )


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


def sparse_branch_flex(q: Tensor, k: Tensor, v: Tensor, select: Tensor, block_q: int, block_k: int) -> Tensor:
    """(2) with block-sparse flex_attention over the selection [B, H, QB, KB]: [B, M, H, d]."""
    m = q.shape[1]
    length = num_blocks(m, flex.BLOCK) * flex.BLOCK  # padded: flex runs faster on whole blocks
    block_mask = selection_block_mask(select, block_q, block_k, length, num_keys=m)
    q, k, v = (pad_tokens(t, length).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    return flex.run(q, k, v, block_mask, "sla_blocks").transpose(1, 2)[:, :m]


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
        impl: flex.Impl = "auto",
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

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        select = select_key_blocks(q, k, self.block_q, self.block_k, self.sparsity)  # [B, H, QB, KB]
        if flex.resolve_impl(self.impl, q) == "flex":
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
        if flex.resolve_impl(self.impl, q) == "flex":
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
        attend_reads_x=False,
    )
