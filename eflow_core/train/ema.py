"""Exponential moving average of the model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class EMA:
    """ema <- decay_n * ema + (1 - decay_n) * online, with decay_n = min(decay, (1 + n) / (10 + n)).

    The EMA is a full copy of the model, taken before any parallelize() wrapping; under FSDP2 the trainer
    shards it like the model (eflow.parallel.fsdp), so every rank holds the same slice of both and
    updates its slice of the EMA from its slice of the weights, with no communication."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        pairs = list(zip(self.model.parameters(), model.parameters(), strict=True))
        if any(isinstance(e, DTensor) != isinstance(p, DTensor) for e, p in pairs):
            raise ValueError("EMA.update: the EMA and the model are not sharded alike")
        ema_params = [_local(e) for e, _ in pairs]
        params = [_local(p.detach()) for _, p in pairs]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        self.updates += 1


def _local(param: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: updating it updates the parameter), else the tensor itself."""
    return param.to_local() if isinstance(param, DTensor) else param
