"""The block's default feed-forward network, and the call contract every FFN follows: ffn(x, ctx).

A backend may bring its own FFN (Sana's convolutional Mix-FFN) by overriding
SelfAttention.feed_forward(dim, hidden); the block calls whichever module it gets as ffn(x, ctx), so an
FFN that needs the token grid (convolutions) reads it from ctx and the model has no special case.
"""

from __future__ import annotations

from torch import Tensor, nn

from eflow.model.tokens import TokenContext


class FeedForward(nn.Module):
    """Linear(D, hidden) -> GELU(tanh) -> Linear(hidden, D), token-wise (ctx unused)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, ctx: TokenContext | None = None) -> Tensor:
        """[B, M, D] -> [B, M, D]."""
        return self.fc2(self.act(self.fc1(x)))
