"""The `none` token-drop strategy: keep every token."""

from __future__ import annotations

import torch
from torch import Tensor


class NoDrop:
    """Keeps all N tokens whatever the ratio (dense middle stack)."""

    def select(
        self, grid: tuple[int, int, int], batch: int, ratio: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """[B, N] raster indices 0..N-1 for every sample."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token-drop ratio must be in [0, 1), got {ratio}")
        n = grid[0] * grid[1] * grid[2]
        device = generator.device if generator is not None else None
        return torch.arange(n, device=device).repeat(batch, 1)  # [B, N]
