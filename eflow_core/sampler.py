"""What a sampler plugin implements: noise at t = 1 -> latents at t = 0.

A sampler reports its progress through an optional `callback(step, total, latents)`, called once at
the end of each of its `total` steps with the step's index (0 .. total - 1) and the latents after it.
Samplers written before the callback existed take no `callback` argument; `takes_callback` tells them
apart, so they still run (without step reports).
"""

from __future__ import annotations

import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.condition import Condition
from eflow.timesteps import sampling_schedule

StepCallback = Callable[[int, int, Tensor], None]  # (step, total, latents after the step)
# one step of a grid walk: (x, t [B] at t_now, t_now, t_next) -> x at t_next
GridStep = Callable[[Tensor, Tensor, float, float], Tensor]


def shift_field(description: str):
    """The `shift` option of a sampler on the shifted time grid (default 3, > 0), with its own help."""
    return Field(3.0, gt=0, description=description)


class ShiftOptions(BaseModel):
    """Options of a sampler whose only option is the shift of its time grid; a sampler subclasses it to
    name itself and say what its shift means (`shift: float = shift_field("...")`)."""

    model_config = ConfigDict(extra="forbid")

    shift: float = shift_field("time-grid shift toward noise, t <- shift t / (1 + (shift - 1) t)")


def time_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the times given with latents `x`: x's, but at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def guidance_input(guidance: float | None, x: Tensor) -> Tensor | None:
    """The model's guidance input w [B] (in time_dtype(x)) for a batch `x`; None stays None."""
    if guidance is None:
        return None
    return torch.full((x.shape[0],), float(guidance), device=x.device, dtype=time_dtype(x))


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

    def walk(
        self,
        noise: Tensor,
        steps: int,
        step: GridStep,
        callback: StepCallback | None = None,
        nfe_per_step: int = 1,
    ) -> Tensor:
        """x <- noise, then x <- step(x, t, t_now, t_next) for each pair t_now > t_next of the shifted grid
        sampling_schedule(steps, self.shift), t [B] = t_now in time_dtype(noise); counts `nfe_per_step`
        network evaluations per step into `last_nfe` and calls `callback(i, steps, x)` after step i."""
        times = sampling_schedule(steps, self.shift)
        b, dtype = noise.shape[0], time_dtype(noise)  # times stay >= float32
        x, self.last_nfe = noise, 0
        for i, (t_now, t_next) in enumerate(itertools.pairwise(times.tolist())):
            t = torch.full((b,), t_now, device=noise.device, dtype=dtype)
            x = step(x, t, t_now, t_next)
            self.last_nfe += nfe_per_step
            if callback is not None:
                callback(i, steps, x)
        return x


class GridSampler(Sampler):
    """A sampler of `nfe_per_step` network evaluations per step of the shifted grid: a subclass says what
    one step does (`stepper`); `sample` walks the grid with it (Sampler.walk)."""

    nfe_per_step = 1

    @abstractmethod
    def stepper(
        self, model, noise: Tensor, cond: Condition, guidance: float | None, generator: torch.Generator | None
    ) -> GridStep:
        """The step function `step(x, t, t_now, t_next)` of one `sample` call (its arguments fixed)."""

    @torch.no_grad()
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
        """noise [B, C, T, H, W] at t = 1 -> latents at t = 0 in `steps` steps; `callback(i, steps, x)`
        after step i."""
        step = self.stepper(model, noise, cond, guidance, generator)
        return self.walk(noise, steps, step, callback, self.nfe_per_step)


def takes_callback(sampler) -> bool:
    """Whether `sampler.sample` accepts `callback=` (a named parameter or **kwargs)."""
    try:
        parameters = inspect.signature(sampler.sample).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return False
    return any(p.name == "callback" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
