"""What a sampler plugin implements: noise at t = 1 -> latents at t = 0."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from eflow.condition import Condition


class Sampler(ABC):
    """Base of samplers on a shifted time grid; `last_nfe` counts network evaluations per sample."""

    def __init__(self, shift: float = 3.0):
        self.shift = shift  # time-grid shift toward noise, t <- shift t / (1 + (shift - 1) t)
        self.last_nfe = 0

    @abstractmethod
    def sample(
        self,
        model,
        noise: Tensor,
        cond: Condition,
        steps: int,
        guidance: float | None = 4.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """noise [B, C, T, H, W] -> latents; `model(x, t, s, cond, w, path)` returns F."""
