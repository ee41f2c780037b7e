"""EFlow's few-step sampler (Algorithm 2): jump to data with the solution map, re-noise with fresh noise, repeat.

x <- x1 ~ N(0, I); for t_n = 1 > ... > t_1 (shifted uniform grid): x0_hat = f(x, t_n, 0, c, w) = x - t_n F(x, t_n, 0, c, w);
if t_{n-1} > 0: x <- t_{n-1} z + (1 - t_{n-1}) x0_hat with fresh z ~ N(0, I); else return x0_hat.
Guidance w is the model's guidance input (CFG was folded in at training): 1 NFE per step.
"""

from __future__ import annotations

import itertools

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.api import Condition, Sampler, StepCallback, hookimpl, randn_like, sampling_schedule, solution_map


class SolutionOptions(BaseModel):
    """Options of the `solution` sampler."""

    model_config = ConfigDict(extra="forbid")

    shift: float = Field(3.0, gt=0, description="shift of the inference time grid; EFlow B.3 (shift = 3)")


class SolutionSampler(Sampler):
    """Algorithm 2 with N steps (N = 1: one jump f(x1, 1, 0)); `last_nfe` = network evaluations per sample (= N)."""

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
        """noise [B, C, T, H, W] at t = 1 -> latents; `generator` draws the re-noising noise;
        `callback(i, steps, x)` after step i."""
        times = sampling_schedule(steps, self.shift)
        b = noise.shape[0]
        tdtype = torch.promote_types(noise.dtype, torch.float32)  # times stay >= float32
        w = None if guidance is None else torch.full((b,), float(guidance), device=noise.device, dtype=tdtype)
        x, self.last_nfe = noise, 0
        for i, (t_now, t_next) in enumerate(itertools.pairwise(times.tolist())):
            t = torch.full((b,), t_now, device=noise.device, dtype=tdtype)
            s = torch.zeros_like(t)
            x0_hat = solution_map(x, t, s, model(x, t, s, cond, w, path="full"))
            self.last_nfe += 1
            if t_next > 0:
                x = t_next * randn_like(x, generator) + (1 - t_next) * x0_hat
            else:
                x = x0_hat
            if callback is not None:
                callback(i, steps, x)
        return x


@hookimpl
def register_samplers(register):
    register(
        "solution",
        SolutionSampler,
        summary="EFlow Algorithm 2: N solution-map jumps to t = 0 with fresh re-noising (1 NFE/step); for sfm, pdg-sfm",
        options=SolutionOptions,
    )
