"""The sampler of an MLCD student (objective `mlcd`): one solution-map jump per trajectory segment.

The segment ends 1 = b_S > ... > b_0 = 0 are the shifted uniform grid (sampling_schedule(S, shift), the
boundaries `mlcd` trained with when S = its `segments` and shift = its `shift`):

    x <- x1 ~ N(0, I);  for k = S-1, ..., 0:  x <- f(x, b_{k+1}, b_k, c, w) = x + (b_k - b_{k+1}) F(x, b_{k+1}, b_k, c, w)

Deterministic (the multistep consistency sampler of Heek et al. 2024 follows the teacher's ODE from one
segment end to the next; no re-noising). w is the model's guidance input (the CFG scale the student was
distilled at): 1 NFE per segment.
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
    shift_field,
    solution_map,
)


class SegmentOptions(ShiftOptions):
    """Options of the `segment` sampler."""

    shift: float = shift_field("shift of the segment ends; must be the `mlcd` run's shift (default 3)")


class SegmentSampler(GridSampler):
    """`steps` jumps b_{k+1} -> b_k; run it with steps = the run's segments. `last_nfe` = steps.
    Deterministic: `generator` is unused."""

    def stepper(
        self, model, noise: Tensor, cond: Condition, guidance: float | None, generator: torch.Generator | None
    ) -> GridStep:
        w = guidance_input(guidance, noise)

        def jump(x: Tensor, t: Tensor, t_now: float, t_next: float) -> Tensor:
            s = torch.full_like(t, t_next)
            return solution_map(x, t, s, model(x, t, s, cond, w, path="full"))

        return jump


@hookimpl
def register_samplers(register):
    register(
        "segment",
        SegmentSampler,
        summary="MLCD student: one solution-map jump per segment end to the next (1 NFE/segment); for mlcd",
        options=SegmentOptions,
    )
