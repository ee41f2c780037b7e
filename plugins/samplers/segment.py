"""The sampler of an MLCD student (objective `mlcd`): one solution-map jump per trajectory segment.

The segment ends 1 = b_S > ... > b_0 = 0 are the shifted uniform grid (sampling_schedule(S, shift), the
boundaries `mlcd` trained with when S = its `segments` and shift = its `shift`):

    x <- x1 ~ N(0, I);  for k = S-1, ..., 0:  x <- f(x, b_{k+1}, b_k, c, w) = x + (b_k - b_{k+1}) F(x, b_{k+1}, b_k, c, w)

Deterministic (the multistep consistency sampler of Heek et al. 2024 follows the teacher's ODE from one
segment end to the next; no re-noising). w is the model's guidance input (the CFG scale the student was
distilled at): 1 NFE per segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.api import Condition, Sampler, hookimpl, sampling_schedule, solution_map


class SegmentOptions(BaseModel):
    """Options of the `segment` sampler."""

    model_config = ConfigDict(extra="forbid")

    shift: float = Field(
        3.0, gt=0, description="shift of the segment ends; must be the `mlcd` run's shift (default 3)"
    )


class SegmentSampler(Sampler):
    """`steps` jumps b_{k+1} -> b_k; run it with steps = the run's segments. `last_nfe` = steps."""

    @torch.no_grad()
    def sample(
        self,
        model,
        noise: Tensor,
        cond: Condition,
        steps: int,
        guidance: float | None = 4.0,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int, Tensor], None] | None = None,
    ) -> Tensor:
        """noise [B, C, T, H, W] at t = 1 -> latents at t = 0 (deterministic: `generator` is unused);
        `callback(i, steps, x)` after jump i."""
        times = sampling_schedule(steps, self.shift)
        b = noise.shape[0]
        tdtype = torch.promote_types(noise.dtype, torch.float32)  # times stay >= float32
        w = None if guidance is None else torch.full((b,), float(guidance), device=noise.device, dtype=tdtype)
        x, self.last_nfe = noise, 0
        for i, (t_now, t_next) in enumerate(itertools.pairwise(times.tolist())):
            t = torch.full((b,), t_now, device=noise.device, dtype=tdtype)
            s = torch.full((b,), t_next, device=noise.device, dtype=tdtype)
            x = solution_map(x, t, s, model(x, t, s, cond, w, path="full"))
            self.last_nfe += 1
            if callback is not None:
                callback(i, steps, x)
        return x


@hookimpl
def register_samplers(register):
    register(
        "segment",
        SegmentSampler,
        summary="MLCD student: one solution-map jump per segment end to the next (1 NFE/segment); for mlcd",
        options=SegmentOptions,
    )
