"""What a token-drop plugin implements: which tokens the middle stack keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class TokenDrop(ABC):
    """Base of token-drop plugins: `select` checks the ratio, `keep` picks the tokens."""

    def select(
        self, grid: tuple[int, int, int], batch: int, ratio: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """[B, M] sorted raster indices of the kept tokens (M the same for every row), on the generator's device."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"token-drop ratio must be in [0, 1), got {ratio}")
        device = generator.device if generator is not None else torch.device("cpu")
        return self.keep(grid, batch, ratio, generator, device)

    def effective_ratio(self, ratio: float) -> float:
        """The share of tokens this strategy really drops at a scheduled `ratio` (`none`: always 0)."""
        return ratio

    @abstractmethod
    def keep(
        self,
        grid: tuple[int, int, int],
        batch: int,
        ratio: float,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """[B, M] sorted raster indices for a ratio already checked to lie in [0, 1)."""
