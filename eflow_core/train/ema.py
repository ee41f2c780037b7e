"""Exponential moving average of the model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class EMA:
    """ema <- decay_n * ema + (1 - decay_n) * online, with decay_n = min(decay, (1 + n) / (10 + n)).

    The EMA is a plain full copy of the model, taken before any parallelize() wrapping. When the online
    model is sharded (FSDP2), each weight is gathered in turn to update the copy (every rank calls
    `update`, so the gathers pair up): the copy stays whole on every rank, and the objectives' EMA passes
    and the previews need no communication."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if any(isinstance(p, DTensor) for p in params):
            for ema_p, p in zip(ema_params, params, strict=True):  # one gathered weight at a time
                ema_p.lerp_(p.full_tensor() if isinstance(p, DTensor) else p, 1.0 - d)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        self.updates += 1
