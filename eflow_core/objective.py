"""What an objective plugin implements and returns, and what it declares it costs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from eflow.errors import ConfigError
from eflow.registry import format_validation_error

OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class ForwardCost:
    """Network forward passes per training sample, by kind (expected values over the batch split)."""

    full_grad: float = 0.0  # full path, with gradient
    full_nograd: float = 0.0  # full path, without gradient (online under no_grad, or EMA)
    weak: float = 0.0  # weak path (middle stack skipped), with or without gradient

    def as_dict(self) -> dict[str, float]:
        return {"full_grad": self.full_grad, "full_nograd": self.full_nograd, "weak": self.weak}


@dataclass(frozen=True)
class StepInfo:
    """Where training is: the objective may schedule on it (SCM's l - t schedule, MVA activation)."""

    step: int  # 0-based optimizer step
    total_steps: int  # planned run length
    mva_share: float = 0.0  # fraction of the batch for MVA in the current stage (SFM family only)
    stage: int = 0  # index of the current stage of the schedule
    batch_start: int = 0  # this rank's first row in the step's global batch
    global_batch: int | None = None  # rows of the step's global batch (None: this rank's batch is all of it)

    def share(self, rows: int) -> tuple[int, slice]:
        """(N, mine) for a local batch of `rows`: draw a sample's randomness for all N rows of the global
        batch (the trainer seeds torch's RNG alike on every rank) and keep `mine`. The draws of a sample
        then do not depend on the number of ranks; with one rank N = rows and mine is everything."""
        total = rows if self.global_batch is None else self.global_batch
        return total, slice(self.batch_start, self.batch_start + rows)


def batch_share(info: StepInfo | None, rows: int) -> tuple[int, slice]:
    """StepInfo.share, or (rows, everything) without a StepInfo (a direct call of an objective's draw)."""
    return (rows, slice(0, rows)) if info is None else info.share(rows)


def rows_in(indices: Tensor, mine: slice) -> Tensor:
    """The global row indices that fall in `mine`, as local ones, in their order."""
    inside = (indices >= mine.start) & (indices < mine.stop)
    return indices[inside] - mine.start


@dataclass
class LossOutput:
    """A scalar loss to backpropagate plus named metrics for logging: floats, or 0-dim tensors left where
    they were computed (no host sync inside the step; the trainer copies them all at once, `to_floats`)."""

    loss: Tensor
    metrics: dict[str, float | Tensor] = field(default_factory=dict)


def to_floats(values: dict[str, float | Tensor]) -> dict[str, float]:
    """`values` as floats; the 0-dim tensors among them reach the host in one copy (one sync, not one
    per value)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    floats = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        device = next(iter(tensors.values())).device
        # float64: the values as exact as .item() gave them (fp64 runs included)
        stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in tensors.values()])
        floats.update(zip(tensors, stacked.tolist(), strict=True))
    return {k: floats[k] for k in values}


class Objective(ABC):
    """Base class of objective plugins.

    loss(net, batch, info) -> LossOutput, where `net` is an eflow.network.Network (call it like the model:
    net(x_t, t, s, cond, guidance, path="full"|"weak") -> F, or net.solution(...) -> f = x_t + (s - t) F),
    `batch` = {"x0": latents [B, C, T, H, W], "cond": Condition} and `info` a StepInfo.
    """

    @abstractmethod
    def loss(self, net, batch: dict, info: StepInfo) -> LossOutput:
        """The step's loss and metrics."""

    def effective_mva_share(self, mva_share: float) -> float:
        """The share of the batch this objective trains with MVA at a scheduled `mva_share` (0: no MVA term)."""
        return 0.0

    def uses_ema(self, info: StepInfo) -> bool:
        """Whether the step of `info` may call net.ema. Every rank asks, so it must depend on `info` and
        the options alone; under FSDP the trainer gathers the sharded EMA for the steps that say True."""
        return True

    @abstractmethod
    def cost(self, mva_share: float = 0.0) -> ForwardCost:
        """Expected forward passes per sample (declared, so runs can be compared before they start)."""


def validated_options(model: type[OptionsT], options: dict[str, Any], name: str) -> OptionsT:
    """model(**options) for objective `name`, with pydantic errors turned into one ConfigError naming the
    fields (as the registry reports options given in a config)."""
    try:
        return model.model_validate(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"objective '{name}' options", model)) from None
