"""What a sampler plugin implements: noise at t = 1 -> latents at t = 0.

A sampler reports its progress through an optional `callback(step, total, latents)`, called once at
the end of each of its `total` steps with the step's index (0 .. total - 1) and the latents after it.
Samplers written before the callback existed take no `callback` argument; `takes_callback` tells them
apart, so they still run (without step reports).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from eflow.condition import Condition

StepCallback = Callable[[int, int, Tensor], None]  # (step, total, latents after the step)


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
        callback: StepCallback | None = None,
    ) -> Tensor:
        """noise [B, C, T, H, W] -> latents; `model(x, t, s, cond, w, path)` returns F; `callback(step,
        total, x)` (if given) after each step."""


def takes_callback(sampler) -> bool:
    """Whether `sampler.sample` accepts `callback=` (a named parameter or **kwargs)."""
    try:
        parameters = inspect.signature(sampler.sample).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return False
    return any(p.name == "callback" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
