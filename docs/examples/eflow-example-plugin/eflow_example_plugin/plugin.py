"""The module the `eflow` entry point names: its @hookimpl functions register two implementations.

chunk-softmax  attention backend: softmax among the kept tokens of the same chunk of latent frames.
frames         token-drop strategy: drop whole latent frames; a kept frame keeps all its tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.api import SelfAttention, TokenContext, TokenDrop, dense_attention, hookimpl

# ----- attention backend ----------------------------------------------------------------------------


class ChunkSoftmaxOptions(BaseModel):
    """Options of the `chunk-softmax` attention backend."""

    model_config = ConfigDict(extra="forbid")  # a typo in a config fails, naming the field

    chunk_frames: int = Field(
        2, ge=1, description="latent frames per chunk; a token attends within its chunk"
    )


class ChunkSoftmaxAttention(SelfAttention):
    """Softmax attention restricted to non-overlapping chunks of `chunk_frames` latent frames.

    SelfAttention does the shared part (QKV, QK RMSNorm, heads, RoPE, output projection); this class
    only mixes values in `attend`. A token's chunk comes from its raster index on the full grid
    (ctx.index), so dropped tokens only leave their chunk with fewer keys. The [B, M, M] mask makes
    this an O(M^2)-memory reference; a fast version would read ctx.index in a flex_attention mask_mod.
    """

    def __init__(self, dim: int, num_heads: int, chunk_frames: int = 2):
        super().__init__(dim, num_heads)
        self.chunk_frames = chunk_frames

    def chunk_mask(self, ctx: TokenContext) -> Tensor:
        """[B, M, M] bool: True where query and key lie in the same chunk."""
        chunk = ctx.index // (ctx.tokens_per_frame * self.chunk_frames)  # [B, M]
        return chunk[:, :, None] == chunk[:, None, :]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """q, k, v [B, M, H, d] -> [B, M, H, d]. A token always sees itself, so no mask row is empty."""
        mask = self.chunk_mask(ctx)[:, None]  # [B, 1, M, M], the same for every head
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, d]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2)  # [B, M, H, d]

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: TokenContext, x: Tensor) -> Tensor:
        """Plain-torch ground truth of `attend`; eflow's tests/test_attention.py compares the two."""
        return dense_attention(q, k, v, self.chunk_mask(ctx))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_frames={self.chunk_frames}"


# ----- token-drop strategy --------------------------------------------------------------------------


class FramesOptions(BaseModel):
    """Options of the `frames` token-drop strategy."""

    model_config = ConfigDict(extra="forbid")

    contiguous: bool = Field(
        False, description="keep one run of consecutive frames instead of a random subset of frames"
    )


class FramesDrop(TokenDrop):
    """Drops whole latent frames: keeps T' - floor(ratio * T') frames (at least one) with all their tokens.

    Images (T' = 1) keep everything. The number of kept tokens M is the same for every sample.
    TokenDrop.select checks the ratio and picks the device; this class only chooses the frames.
    """

    def __init__(self, contiguous: bool = False):
        self.contiguous = contiguous

    @staticmethod
    def kept_frames(frames: int, ratio: float) -> int:
        return max(1, frames - math.floor(ratio * frames + 1e-9))

    def keep(
        self,
        grid: tuple[int, int, int],
        batch: int,
        ratio: float,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """[B, M] sorted raster indices of the kept tokens, M = kept_frames * H' * W'."""
        t, h, w = grid
        keep = self.kept_frames(t, ratio)
        if self.contiguous:
            start = torch.randint(0, t - keep + 1, (batch, 1), generator=generator, device=device)
            frames = start + torch.arange(keep, device=device)  # [B, keep], ascending
        else:
            scores = torch.rand(batch, t, generator=generator, device=device)  # [B, T']
            frames = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # [B, keep], ascending
        per_frame = h * w
        index = frames[:, :, None] * per_frame + torch.arange(per_frame, device=device)  # [B, keep, H'W']
        return index.flatten(1)  # [B, M]: sorted, because raster order is frame-major


# ----- registration ---------------------------------------------------------------------------------


@hookimpl
def register_attention(register):
    register(
        "chunk-softmax",
        ChunkSoftmaxAttention,
        summary="Softmax within chunks of chunk_frames latent frames (example plugin; O(M^2) mask).",
        options=ChunkSoftmaxOptions,
    )


@hookimpl
def register_token_drop(register):
    register(
        "frames",
        FramesDrop,
        summary="Drop whole latent frames: keep T' - floor(ratio * T') frames (example plugin).",
        options=FramesOptions,
    )
