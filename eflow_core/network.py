"""What an objective or sampler calls: the model, its EMA copy, token dropping and a pass counter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eflow.condition import Condition


@dataclass
class DropPlan:
    """Token dropping for the middle stack: a token-drop plugin, a ratio and the RNG it draws from."""

    selector: object  # has .select(grid, batch, ratio, generator) -> index [B, M]
    ratio: float
    generator: torch.Generator | None = None


class Network:
    """Calls the model like `model(x_t, t, s, cond, guidance, path)` and counts forward passes per sample.

    With a DropPlan, every full-path call draws a fresh kept-token set for the middle stack.
    `counts` holds samples pushed through each kind of pass: full_grad, full_nograd, weak.
    """

    def __init__(self, model: nn.Module, ema: nn.Module | None = None, drop: DropPlan | None = None):
        self.model = model
        self.ema_model = ema
        self.drop = drop
        self.counts: Counter[str] = Counter()

    def _keep(self, x_t: Tensor, path: str) -> Tensor | None:
        if self.drop is None or self.drop.ratio <= 0 or path != "full":
            return None
        grid = self.model.token_grid(x_t.shape)
        return self.drop.selector.select(grid, x_t.shape[0], self.drop.ratio, self.drop.generator).to(
            x_t.device
        )

    def _count(self, n: int, path: str, grad: bool) -> None:
        self.counts["weak" if path == "weak" else ("full_grad" if grad else "full_nograd")] += n

    def _forward(self, model: nn.Module, x_t, t, s, cond, guidance, path: str, grad: bool) -> Tensor:
        self._count(x_t.shape[0], path, grad)
        return model(x_t, t, s, cond, guidance, path=path, keep=self._keep(x_t, path))

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
    ) -> Tensor:
        """F of the online model; gradient flows when torch.is_grad_enabled()."""
        return self._forward(self.model, x_t, t, s, cond, guidance, path, torch.is_grad_enabled())

    @torch.no_grad()
    def ema(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
    ) -> Tensor:
        """F of the EMA model (no gradient); falls back to the online model under no_grad if there is none."""
        model = self.ema_model if self.ema_model is not None else self.model
        return self._forward(model, x_t, t, s, cond, guidance, path, False)

    def solution(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
        target: str = "online",
    ) -> Tensor:
        """f(x_t, t, s) = x_t + (s - t) F; target="online" (grad if enabled), "sg" (online, no grad) or "ema"."""
        if target == "ema":
            F = self.ema(x_t, t, s, cond, guidance, path)
        elif target == "sg":
            with torch.no_grad():
                F = self(x_t, t, s, cond, guidance, path)
        else:
            F = self(x_t, t, s, cond, guidance, path)
        return solution_map(x_t, t, s, F)


def solution_map(x_t: Tensor, t: Tensor, s: Tensor, F: Tensor) -> Tensor:
    """f = x_t + (s - t) F with t, s [B] broadcast over the sample's dims (exactly x_t when s == t).

    Computed in at least float32: a bf16 F must not quantize small time gaps.
    """
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    gap = (s - t).to(dtype).view(-1, *([1] * (F.dim() - 1)))
    return (x_t.to(dtype) + gap * F.to(dtype)).to(x_t.dtype)


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))
