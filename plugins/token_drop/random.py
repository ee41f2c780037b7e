"""The `random` token-drop strategy: a uniformly random subset per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RandomDrop:
    """Drops floor(ratio * N) tokens chosen uniformly at random, independently per sample."""

    def select(
        self, grid: tuple[int, int, int], batch: int, ratio: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """[B, M] sorted raster indices with M = N - floor(ratio * N)."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token-drop ratio must be in [0, 1), got {ratio}")
        n = grid[0] * grid[1] * grid[2]
        m = n - math.floor(ratio * n + 1e-9)
        device = generator.device if generator is not None else None
        scores = torch.rand(batch, n, generator=generator, device=device)  # [B, N]
        return scores.argsort(dim=1)[:, :m].sort(dim=1).values  # [B, M]
