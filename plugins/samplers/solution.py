"""EFlow's few-step sampler (Algorithm 2): jump to data with the solution map, re-noise with fresh noise, repeat.

x <- x1 ~ N(0, I); for t_n = 1 > ... > t_1 (shifted uniform grid): x0_hat = f(x, t_n, 0, c, w) = x - t_n F(x, t_n, 0, c, w);
if t_{n-1} > 0: x <- t_{n-1} z + (1 - t_{n-1}) x0_hat with fresh z ~ N(0, I); else return x0_hat.
Guidance w is the model's guidance input (CFG was folded in at training): 1 NFE per step.

With renoise = false the steps follow the solution map itself instead (deterministic, no fresh noise):
x <- f(x, t_n, t_{n-1}, c, w) = x + (t_{n-1} - t_n) F(x, t_n, t_{n-1}, c, w). The SFM family trains F on
pairs (t, s) with any s < t (eflow.timesteps.sample_scm_times), so these jumps are ones it learned;
the last jump (s = 0) is Algorithm 2's.
"""

from __future__ import annotations

import torch
from pydantic import Field
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
    renoise: bool = Field(
        True,
        description="true: EFlow Algorithm 2 (jump to t = 0, re-noise to the next time); false: jump along "
        "the solution map to the next time (deterministic)",
    )


class SolutionSampler(GridSampler):
    """Algorithm 2 with N steps (N = 1: one jump f(x1, 1, 0)); `last_nfe` = network evaluations per sample (= N).
    `generator` draws the re-noising noise."""

    def __init__(self, shift: float = 3.0, renoise: bool = True):
        super().__init__(shift)
        self.renoise = renoise

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

        def jump(x: Tensor, t: Tensor, t_now: float, t_next: float) -> Tensor:
            s = torch.full_like(t, t_next)
            return solution_map(x, t, s, model(x, t, s, cond, w, path="full"))

        return jump_and_renoise if self.renoise else jump


@hookimpl
def register_samplers(register):
    register(
        "solution",
        SolutionSampler,
        summary="EFlow Algorithm 2: N solution-map jumps to t = 0 with fresh re-noising (1 NFE/step; renoise=false: "
        "jumps between grid times); for sfm, pdg-sfm",
        options=SolutionOptions,
    )
