"""The `none` token-drop strategy: keep every token."""

from __future__ import annotations

import torch
from torch import Tensor

from eflow.api import TokenDrop


class NoDrop(TokenDrop):
    """Keeps all N tokens whatever the ratio (dense middle stack)."""

    def effective_ratio(self, ratio: float) -> float:
        """Nothing is dropped, whatever the schedule says."""
        return 0.0

    def keep(self, grid, batch, ratio, generator, device) -> Tensor:
        """[B, N] raster indices 0..N-1 for every sample."""
        n = grid[0] * grid[1] * grid[2]
        return torch.arange(n, device=device).repeat(batch, 1)  # [B, N]
