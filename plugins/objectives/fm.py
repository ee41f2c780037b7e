"""Flow matching (FM): L = || F(x_t, t, t, c) - v ||^2 with x_t = (1 - t) x0 + t x1 and v = x1 - x0.

t ~ logit-normal(mu, sigma) with a shift toward noise; labels drop to the null condition with probability
`label_dropout` so the same network gives the unconditional velocity for classifier-free guidance at
sampling time (the `euler` sampler). The model's guidance input is zero throughout: FM learns plain
(unguided) velocities and CFG is applied outside the network, at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from eflow.api import (
    Condition,
    ForwardCost,
    LossOutput,
    Objective,
    StepInfo,
    adaptive_weight,
    batch_share,
    expand_like,
    hookimpl,
    logit_normal,
    per_sample_mse,
    rand,
    randn,
    validated_options,
)

SFM_ONLY_OPTIONS = (
    "mva",
    "mva_target",
    "mva_grid_points",
    "mva_grid_shift",
    "fm_ratio",
    "scm_ratio",
    "p_drop",
)


class FMOptions(BaseModel):
    """Options of the `fm` objective."""

    model_config = ConfigDict(extra="forbid")

    # the names of sfm's options for the same quantities; runs written before 2026-11-30 say mu, sigma, shift
    mu_t: float = Field(
        0.0,
        validation_alias=AliasChoices("mu_t", "mu"),
        description="logit-normal mean of t; EFlow Table 5 (mu_t, sigma_t, shift_t) = (0, 1, 3)",
    )
    sigma_t: float = Field(
        1.0, gt=0, validation_alias=AliasChoices("sigma_t", "sigma"), description="logit-normal std of t"
    )
    shift_t: float = Field(
        3.0,
        gt=0,
        validation_alias=AliasChoices("shift_t", "shift"),
        description="time shift toward noise, t <- shift t / (1 + (shift-1) t); EFlow Table 5",
    )
    label_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="probability a label becomes the null condition (CFG training); SoFlow / DiT 0.1",
    )
    adaptive_weight: bool = Field(
        False, description="SoFlow's adaptive weight 1/(e + eps)^p; off = plain MSE (DiT/SiT FM)"
    )
    p: float = Field(
        1.0, ge=0, description="adaptive-weight power; EFlow Table 5 'loss weight coefficient' 1.0"
    )
    eps: float = Field(0.01, gt=0, description="adaptive-weight stabilizer; SoFlow ImageNet config 0.01")

    @model_validator(mode="before")
    @classmethod
    def _no_solution_flow_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            wrong = [k for k in data if k in SFM_ONLY_OPTIONS]
            if wrong:
                raise ValueError(
                    f"{', '.join(wrong)}: not an option of objective 'fm' (plain flow matching has no SCM/MVA "
                    "terms or path drop); these belong to 'sfm' / 'pdg-sfm', e.g. --objective pdg-sfm --mva"
                )
        return data


@dataclass
class FMDraws:
    """The random quantities of one FM step: noise x1 [B, ...], times t [B], dropped labels [B] bool."""

    x1: Tensor
    t: Tensor
    dropped: Tensor


class FlowMatching(Objective):
    """|| F(x_t, t, t, c) - v ||^2 (optionally adaptively weighted); one full forward with grad per sample."""

    def __init__(self, *, total_steps: int, **options: Any):
        self.options: FMOptions = validated_options(FMOptions, options, "fm")
        self.total_steps = total_steps

    def draw(
        self, x0: Tensor, generator: torch.Generator | None = None, info: StepInfo | None = None
    ) -> FMDraws:
        """Noise, logit-normal shifted times and label-dropout draws for a batch x0 [B, ...]: drawn for the
        step's global batch, this rank's rows kept (StepInfo.share)."""
        o, (n, mine) = self.options, batch_share(info, x0.shape[0])
        t = logit_normal(n, o.mu_t, o.sigma_t, o.shift_t, generator, x0.device)
        x1 = randn((n, *x0.shape[1:]), generator, x0.device).to(x0.dtype)
        dropped = rand(n, generator, x0.device) < o.label_dropout
        return FMDraws(x1[mine], t[mine], dropped[mine])

    def loss(self, net, batch: dict, info: StepInfo) -> LossOutput:
        """batch = {"x0": [B, C, T, H, W], "cond": Condition, optional "generator"}."""
        draws = self.draw(batch["x0"], batch.get("generator"), info)
        return self.loss_from(net, batch["x0"], batch["cond"], draws)

    def loss_from(self, net, x0: Tensor, cond: Condition, d: FMDraws) -> LossOutput:
        """The FM loss for explicit draws: mean over the batch of w_i || F_i - v_i ||^2 (w_i = 1 unless adaptive)."""
        t = d.t.to(torch.promote_types(x0.dtype, torch.float32))
        tx = expand_like(t, x0).to(x0.dtype)
        x_t = (1 - tx) * x0 + tx * d.x1
        v = d.x1 - x0
        guidance = torch.zeros_like(t)
        F = net(x_t, t, t, cond.drop(d.dropped), guidance, path="full")
        err = per_sample_mse(F, v)
        o = self.options
        weighted = adaptive_weight(err, o.p, o.eps) * err if o.adaptive_weight else err
        loss = weighted.mean()
        return LossOutput(
            loss, {"loss": loss.detach(), "mse": err.detach().mean(), "dropped": d.dropped.float().mean()}
        )

    def uses_ema(self, info: StepInfo) -> bool:
        return False

    def cost(self, mva_share: float = 0.0) -> ForwardCost:
        """One full-path forward with gradient per sample (FM has no MVA term; mva_share is ignored)."""
        return ForwardCost(full_grad=1.0)


@hookimpl
def register_objectives(register):
    register(
        "fm",
        FlowMatching,
        summary="flow matching: ||F(x_t,t,t,c) - (x1 - x0)||^2, label dropout for CFG; sample with euler",
        options=FMOptions,
        default_sampler="euler",
        same_calls_every_rank=True,  # one full pass with gradient per sample, always
    )
