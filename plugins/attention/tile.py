"""Efficient-vDiT's "Attention Tile": softmax within each latent frame plus a few global reference frames.

Shared projections (see SelfAttention): Q, K with RMSNorm and RoPE, V, per head of size d. A token's
latent frame is f_i = n_i // (H' W'), n_i its raster index on the full grid (so dropped tokens are
simply absent keys). With R reference frames and a frame window w:

    A(i) = { kept j : |f_i - f_j| <= w  or  f_j < R }
    o_i  = softmax( q_i K_A(i)^T / sqrt(d) ) V_A(i)

Every query sees the kept tokens of its own frame (and of the w frames on each side) and of the first
R frames, the tile pattern of the paper: block-diagonal frame tiles plus the reference-frame columns.
The reference frames are the R leading frames (Efficient-vDiT's global reference is the first frame);
their own queries attend as any other frame's do (own frame, window, reference frames), so the cost
is O(M * (2w + 1 + R) H' W'): linear in the number of frames.

Implementations: "reference" builds the M x M mask and calls SDPA (CPU); "flex" runs flex_attention
(eflow.model.flex) with a block table built from each 128-token block's frame range (tile_block_mask,
never M x M, once per forward), compiled on CUDA, eager on CPU (forward only).

Per-layer masks: R and w may be lists with one entry per block in global order (Efficient-vDiT
searches the mask of every layer, Algorithm 1; `eflow distill tiles` writes such lists); the model
passes each module its block index through the option `block`, which picks the entry.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from eflow.api import EflowError, SelfAttention, TokenContext, dense_attention, flex, hookimpl

Count = Annotated[int, Field(ge=0)]  # a frame count (R or w)


class TileOptions(BaseModel):
    """Options of the tile attention backend."""

    model_config = ConfigDict(extra="forbid")

    reference_frames: Count | list[Count] = Field(
        1,
        description="R: every query also attends to the kept tokens of the first R latent frames; a list "
        "gives one R per block (global order), as `eflow distill tiles` writes.",
    )
    frame_window: Count | list[Count] = Field(
        0,
        description="w: a query attends to the frames within w of its own (0 = its own frame only); a list "
        "gives one w per block.",
    )
    impl: flex.Impl = Field(
        "auto",
        description="'reference' (dense masked SDPA), 'flex' (block-sparse flex_attention), 'auto' (flex on "
        "CUDA, reference on CPU). flex on CPU runs eagerly, forward only (tests).",
    )
    block: int | None = Field(
        None, ge=0, description="the module's global block index, filled in by the model; picks list entries"
    )


def for_block(value: int | list[int], block: int | None, name: str) -> int:
    """An option's value in global block `block`: the value itself, or its entry of a per-block list."""
    if isinstance(value, int):
        return value
    if block is None:
        raise EflowError(
            f"tile option {name} = {value} is a per-block list; build the module with block=INDEX"
        )
    if block >= len(value):
        raise EflowError(
            f"model.attention_options.{name} lists {len(value)} blocks but the model has block {block}; "
            "give one entry per block"
        )
    return value[block]


def tile_mask(index: Tensor, tokens_per_frame: int, reference_frames: int, frame_window: int) -> Tensor:
    """[B, M] raster indices -> [B, M, M] bool: key j is in a query's frame window or a reference frame."""
    frame = index // tokens_per_frame
    near = (frame[:, :, None] - frame[:, None, :]).abs() <= frame_window
    return near | (frame[:, None, :] < reference_frames)


def tile_pairs(index: Tensor, grid: tuple[int, int, int], reference_frames: int, frame_window: int) -> int:
    """Number of (query, attended key) pairs, summed over the batch, from per-frame token counts."""
    frames = grid[0]
    frame = index // (grid[1] * grid[2])  # [B, M]
    counts = torch.zeros(index.shape[0], frames, dtype=torch.float64, device=index.device)
    counts.scatter_add_(1, frame, torch.ones_like(frame, dtype=torch.float64))  # [B, T']
    f = torch.arange(frames, device=index.device)
    allowed = ((f[:, None] - f[None, :]).abs() <= frame_window) | (f[None, :] < reference_frames)  # [T', T']
    return int(torch.einsum("bf,fg,bg->", counts, allowed.double(), counts).item())


def tile_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    tokens_per_frame: int,
    reference_frames: int,
    frame_window: int,
) -> Tensor:
    """Tile softmax through an explicit [B, 1, M, M] mask and SDPA: [B, M, H, d]."""
    mask = tile_mask(index, tokens_per_frame, reference_frames, frame_window)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)


def tile_block_mask(
    index: Tensor, tokens_per_frame: int, reference_frames: int, frame_window: int, block: int = flex.BLOCK
) -> BlockMask:
    """Block mask of the tile pattern for sorted raster indices [B, M], from each block's frame range.

    Frames are sorted along the kept tokens, so a block covers frames [first, last]. A key block touches
    a query block when it holds a reference-frame token or the frame ranges come within w; it is full
    when all its tokens are reference-frame tokens or every frame pair is within w. Blocks holding
    padding (frame flex.FAR, never < R) are never full. O(B (M / block)^2) work, never M x M;
    TileAttention builds it once per forward (TokenContext.cached).
    """
    m = index.shape[1]
    padded, first, last = flex.block_ranges(index // tokens_per_frame, block)  # frames: [B, L], [B, nb] x 2
    q_lo, q_hi, k_lo, k_hi = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    w, r = frame_window, reference_frames
    touches = ((k_hi >= q_lo - w) & (k_lo <= q_hi + w)) | (k_lo < r)  # [B, QB, KB]
    full = flex.clear_ragged(((k_lo >= q_hi - w) & (k_hi <= q_lo + w)) | (k_hi < r), m, block)

    def tile(b, h, q_idx, kv_idx):
        return ((padded[b, q_idx] - padded[b, kv_idx]).abs() <= w) | (padded[b, kv_idx] < r)

    return flex.from_tables((touches & ~full)[:, None], full[:, None], tile, m, block)


def tile_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    tokens_per_frame: int,
    reference_frames: int,
    frame_window: int,
    block_mask: BlockMask | None = None,
) -> Tensor:
    """Tile softmax with flex_attention (compiled on CUDA, eager on CPU): [B, M, H, d].

    block_mask: tile_block_mask(index, tokens_per_frame, reference_frames, frame_window) when the caller
    holds it already.
    """
    if block_mask is None:
        block_mask = tile_block_mask(index, tokens_per_frame, reference_frames, frame_window)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
    return flex.run(q, k, v, block_mask, "tile_frames").transpose(1, 2)


class TileAttention(SelfAttention):
    """Softmax over the kept tokens of a query's own frame (+- frame_window) and the reference frames."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        reference_frames: int | list[int] = 1,
        frame_window: int | list[int] = 0,
        impl: flex.Impl = "auto",
        block: int | None = None,
    ):
        super().__init__(dim, num_heads)
        opts = TileOptions(
            reference_frames=reference_frames, frame_window=frame_window, impl=impl, block=block
        )
        self.reference_frames = for_block(opts.reference_frames, opts.block, "reference_frames")
        self.frame_window = for_block(opts.frame_window, opts.block, "frame_window")
        self.impl = opts.impl

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        pattern = (ctx.tokens_per_frame, self.reference_frames, self.frame_window)
        if flex.resolve_impl(self.impl, q) == "reference":
            return tile_attention_reference(q, k, v, ctx.index, *pattern)
        block_mask = ctx.cached(("tile_frames", *pattern), lambda: tile_block_mask(ctx.index, *pattern))
        return tile_attention_flex(q, k, v, ctx.index, *pattern, block_mask=block_mask)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Dense softmax with the explicit tile mask (plain torch): [B, M, H, d]."""
        mask = tile_mask(ctx.index, ctx.tokens_per_frame, self.reference_frames, self.frame_window)
        return dense_attention(q, k, v, mask)

    def flops(self, ctx: TokenContext, batch: int) -> float:
        """4 d per (query, attended key) pair per head (QK^T and PV), over the pairs the mask allows."""
        pairs = tile_pairs(ctx.index, ctx.grid, self.reference_frames, self.frame_window)
        return 4.0 * self.num_heads * self.head_dim * pairs * (batch / ctx.index.shape[0])

    def kernel(self, q: Tensor) -> str:
        if flex.resolve_impl(self.impl, q) == "flex":
            return "flex_attention frame tiles" + (" (compiled)" if q.is_cuda else " (eager)")
        return "SDPA with an M x M frame-tile mask"

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, reference_frames={self.reference_frames}, "
            f"frame_window={self.frame_window}, impl={self.impl}"
        )


@hookimpl
def register_attention(register):
    register(
        "tile",
        TileAttention,
        summary="Efficient-vDiT Attention Tile: softmax within each frame plus global reference frames; droppable.",
        options=TileOptions,
        attend_reads_x=False,
    )
