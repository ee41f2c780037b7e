"""Euler sampler for flow-matching models: x <- x + (t_next - t) v from t = 1 to 0 with classifier-free guidance.

v = v_u + w (v_c - v_u), v_c = F(x, t, t, c, 0) and v_u = F(x, t, t, null, 0) evaluated in one batched call
(2 NFE per step). The model's guidance input is 0, as in `fm` training: CFG happens here, outside the network.
w = 1 (or None) needs only v_c and w = 0 only v_u (1 NFE per step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eflow.api import Condition, Sampler, ShiftOptions, StepCallback, hookimpl, shift_field, time_dtype


class EulerOptions(ShiftOptions):
    """Options of the `euler` sampler."""

    shift: float = shift_field(
        "time-grid shift toward noise; 3.0 matches fm's training shift (EFlow Table 5)"
    )


class EulerSampler(Sampler):
    """N Euler steps on the shifted grid 1 = t_N > ... > t_0 = 0; `last_nfe` = network evaluations per sample."""

    @torch.no_grad()
    def sample(
        self,
        model,
        noise: Tensor,
        cond: Condition,
        steps: int,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """noise [B, C, T, H, W] at t = 1 -> latents at t = 0 (deterministic: `generator` is unused);
        `callback(i, steps, x)` after step i."""
        zeros = torch.zeros(noise.shape[0], device=noise.device, dtype=time_dtype(noise))
        use_c = guidance is None or guidance != 0
        use_u = guidance is not None and guidance != 1
        both = Condition.cat([cond, cond.null()]) if use_c and use_u else None

        def step(x: Tensor, t: Tensor, t_now: float, t_next: float) -> Tensor:
            if both is not None:
                v_c, v_u = model(
                    torch.cat([x, x]), t.repeat(2), t.repeat(2), both, zeros.repeat(2), path="full"
                ).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v = model(x, t, t, cond if use_c else cond.null(), zeros, path="full")
            return x + (t_next - t_now) * v

        return self.walk(noise, steps, step, callback, nfe_per_step=2 if both is not None else 1)


@hookimpl
def register_samplers(register):
    register(
        "euler",
        EulerSampler,
        summary="Euler ODE steps from noise to data with classifier-free guidance (2 NFE/step); for fm",
        options=EulerOptions,
    )
