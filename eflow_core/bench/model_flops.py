"""Analytic forward FLOPs of one sample through a VideoDiT: 2 per multiply-add, matrix products only.

On a token grid of N tokens where the middle stack keeps M (full path; M = N without dropping) and the
weak path (PDG) skips the middle stack, with width D, FFN width F, patch volume P = pt ph pw and C
latent channels:

- patch embedding 2 N (C P) D, output head 2 N D (P C), fusion layer 2 N (2D) D;
- every block on its M_b tokens (N for encoder and decoder blocks, M for middle blocks):
  QKV and output projections 8 M_b D^2, FFN 4 M_b D F (the default MLP), and the backend's attend,
  `attn.flops(ctx, 1)` on the block's token context (softmax: 4 M_b^2 D; GLGA: its linear branch, window
  pairs and gate); text models add cross-attention: 4 M_b D^2 (query, output) + 4 L D^2 (key, value
  of L text tokens) + 4 M_b (L + 1) D (scores and values, the null token included);
- conditioning: every Linear of the time, gap and guidance embedders, the shared time projection and
  the head's AdaLN once per sample, and of the text projection once per text token.

`dense` holds what torch.utils.flop_counter.FlopCounterMode counts on a CPU forward (linears and the
patch convolution); `attention` the products inside attention calls, which it cannot see (CPU SDPA,
flex_attention), so the two are kept apart and a test checks `dense` against the counter. Norms,
RoPE, gates' elementwise work and softmax exponentials are not counted (the MFU convention).
A backend without a `flops` method, or one bringing its own FFN, leaves the total undefined (None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from eflow.model.feed_forward import FeedForward
from eflow.model.rope import rope_table
from eflow.model.tokens import TokenContext

BACKWARD_FACTOR = 3.0  # forward + backward = 3 x forward (backward: gradients of inputs and of weights)


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one sample's forward pass, split by what a FLOP counter can see."""

    dense: float | None  # linears and the patch convolution
    attention: float | None  # attend of self- and cross-attention

    @property
    def total(self) -> float | None:
        if self.dense is None or self.attention is None:
            return None
        return self.dense + self.attention


def linear_flops(module: nn.Module | None) -> float:
    """2 x in x out summed over the Linear layers of `module`: its FLOPs for one input vector."""
    if module is None:
        return 0.0
    return sum(2.0 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_flops(block: nn.Module, ctx: TokenContext, text_tokens: int) -> ForwardFlops:
    """One DiTBlock on the ctx's M tokens (batch 1): projections, FFN, attend, cross-attention."""
    attn, m = block.attn, ctx.index.shape[1]
    dim = attn.dim
    dense: float | None = 8.0 * m * dim * dim
    if type(block.ffn) is FeedForward:
        dense += 4.0 * m * dim * block.ffn.fc1.out_features
    else:  # a backend's own FFN (Sana's Mix-FFN): not counted
        dense = None
    count = getattr(attn, "flops", None)
    attention = count(ctx, 1) if callable(count) else None
    if block.cross_attn is not None:
        if dense is not None:
            dense += 4.0 * m * dim * dim + 4.0 * text_tokens * dim * dim
        if attention is not None:
            attention += 4.0 * m * (text_tokens + 1) * dim
    return ForwardFlops(dense, attention)


def forward_flops(
    model: nn.Module,
    grid: tuple[int, int, int],
    keep: Tensor | None = None,
    path: str = "full",
    text_tokens: int = 0,
) -> ForwardFlops:
    """FLOPs of one sample on `grid`; keep [1, M] sorted raster indices the middle stack keeps (None: all)."""
    spec = model.spec
    dim, n, patch_volume = spec.dim, math.prod(grid), math.prod(spec.patch)
    rope = rope_table(grid, model.head_dim, spec.rope_theta)  # [N, d/2], on the CPU
    dense_ctx = TokenContext.dense(grid, 1, rope)
    middle_ctx = dense_ctx if keep is None else dense_ctx.select(keep.cpu(), rope)

    dense = 2.0 * n * spec.in_channels * patch_volume * dim  # patch embedding
    dense += 2.0 * n * dim * patch_volume * spec.in_channels + 2.0 * n * 2 * dim * dim  # head, fusion
    for part in (model.time_embed, model.gap_embed, model.guidance_embed, model.time_proj, model.head.adaLN):
        dense += linear_flops(part)  # once per sample
    dense += text_tokens * linear_flops(model.text_embed)  # once per text token
    attention = 0.0
    stacks = [(model.encoder, dense_ctx), (model.decoder, dense_ctx)]
    if path == "full":
        stacks.append((model.middle, middle_ctx))
    parts = [block_flops(block, ctx, text_tokens) for blocks, ctx in stacks for block in blocks]
    for part in parts:
        dense = None if dense is None or part.dense is None else dense + part.dense
        attention = None if attention is None or part.attention is None else attention + part.attention
    return ForwardFlops(dense, attention)
