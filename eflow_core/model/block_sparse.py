"""Softmax over a selection of logical blocks (SLA's key blocks, VSA's tiles): top-k, masks, BlockMask.

select [B, H, QB, KB] bool says which key block each query block attends; query t is in block
t // block_q, key u in u // block_k. The reference path expands the selection into a [B, H, M, N] token
mask for `masked_attention`; the flex path turns it into a BlockMask (`selection_block_mask`) whose
mask_mod looks each pair's blocks up in the selection, so no M x M tensor exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from eflow.model import flex


def topk_count(sparsity: float, num_blocks: int) -> int:
    """k = ceil((1 - sparsity) * num_blocks) in [1, num_blocks], rounded first (0.2 * 5 gives 1, not 2)."""
    return min(num_blocks, max(1, math.ceil(round((1.0 - sparsity) * num_blocks, 9))))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with a per-head mask [B, H, M, N] (True = may attend): [B, M, H, d]."""
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(q.shape[-1])  # [B, H, M, N]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhmn,bnhd->bmhd", weights, v)


def _logical_ranges(length: int, block: int, flex_block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last logical block (of `block` tokens) that each flex block over `length` tokens touches."""
    start = torch.arange(0, length, flex_block, device=device)
    end = (start + flex_block).clamp(max=length) - 1
    return start // block, end // block


def selection_block_mask(
    select: Tensor,
    block_q: int,
    block_k: int,
    length: int,
    num_keys: int | None = None,
    kv_valid: Tensor | None = None,
    flex_block: int = flex.BLOCK,
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
    nb = flex.num_blocks(length, flex_block)
    # Lookups padded so every index inside a flex block is in range (the kernel evaluates whole blocks).
    rows = torch.arange(flex.num_blocks(nb * flex_block, block_q), device=device).clamp(max=qb - 1)
    sel_pad = torch.zeros(
        b, h, rows.shape[0], flex.num_blocks(nb * flex_block, block_k), dtype=torch.bool, device=device
    )
    sel_pad[:, :, :, :kb] = select[:, :, rows]
    valid = (torch.arange(nb * flex_block, device=device) < num_keys).repeat(b, 1)  # [B, L'] real keys
    if kv_valid is not None:
        valid[:, :length] &= kv_valid
    key_limit = torch.tensor([num_keys], device=device)

    prefix = F.pad(sel_pad.to(torch.int32).cumsum(2).cumsum(3), (1, 0, 1, 0))  # [B, H, QB' + 1, KB' + 1]
    q_lo, q_hi = _logical_ranges(length, block_q, flex_block, device)
    k_lo, k_hi = _logical_ranges(length, block_k, flex_block, device)

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

    return flex.from_tables(touched & ~full, full, selected_pair, length, block=flex_block)
