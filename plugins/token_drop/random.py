"""The `random` token-drop strategy: a uniformly random subset per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eflow.api import TokenDrop


class RandomDrop(TokenDrop):
    """Drops floor(ratio * N) tokens chosen uniformly at random, independently per sample."""

    def keep(self, grid, batch, ratio, generator, device) -> Tensor:
        """[B, M] sorted raster indices with M = N - floor(ratio * N)."""
        n = grid[0] * grid[1] * grid[2]
        m = n - math.floor(ratio * n + 1e-9)
        scores = torch.rand(batch, n, generator=generator, device=device)  # [B, N]
        return scores.argsort(dim=1)[:, :m].sort(dim=1).values  # [B, M]
