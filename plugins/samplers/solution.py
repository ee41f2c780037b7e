"""EFlow's few-step sampler (Algorithm 2): jump to data with the solution map, re-noise with fresh noise, repeat.

x <- x1 ~ N(0, I); for t_n = 1 > ... > t_1 (shifted uniform grid): x0_hat = f(x, t_n, 0, c, w) = x - t_n F(x, t_n, 0, c, w);
if t_{n-1} > 0: x <- t_{n-1} z + (1 - t_{n-1}) x0_hat with fresh z ~ N(0, I); else return x0_hat.
Guidance w is the model's guidance input (CFG was folded in at training): 1 NFE per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eflow.api import (
    Condition,
    GridSampler,
    GridStep,
    ShiftOptions,
    guidance_input,
    hookimpl,
    randn_like,
    shift_field,
    solution_map,
)


class SolutionOptions(ShiftOptions):
    """Options of the `solution` sampler."""

    shift: float = shift_field("shift of the inference time grid; EFlow B.3 (shift = 3)")


class SolutionSampler(GridSampler):
    """Algorithm 2 with N steps (N = 1: one jump f(x1, 1, 0)); `last_nfe` = network evaluations per sample (= N).
    `generator` draws the re-noising noise."""

    def stepper(
        self, model, noise: Tensor, cond: Condition, guidance: float | None, generator: torch.Generator | None
    ) -> GridStep:
        w = guidance_input(guidance, noise)

        def jump_and_renoise(x: Tensor, t: Tensor, t_now: float, t_next: float) -> Tensor:
            s = torch.zeros_like(t)
            x0_hat = solution_map(x, t, s, model(x, t, s, cond, w, path="full"))
            if t_next > 0:
                return t_next * randn_like(x, generator) + (1 - t_next) * x0_hat
            return x0_hat

        return jump_and_renoise


@hookimpl
def register_samplers(register):
    register(
        "solution",
        SolutionSampler,
        summary="EFlow Algorithm 2: N solution-map jumps to t = 0 with fresh re-noising (1 NFE/step); for sfm, pdg-sfm",
        options=SolutionOptions,
    )
