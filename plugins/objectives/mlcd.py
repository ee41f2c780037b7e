"""Efficient-vDiT's distillation objectives (docs/distillation.md): `mlcd` and `attn-distill`.

mlcd: multi-step latent consistency distillation (Efficient-vDiT Stage 1, after Heek et al. 2024's
multistep consistency models and LCM's skipping step and guided teacher). The teacher's probability-flow
ODE, integrated by its own sampler (Euler with classifier-free guidance for an `fm` teacher), runs on the
grid t_j = shift_time(j / N), j = 0..N; S segments end at the boundaries b_k = t_{kN/S}. Within segment k
(b_k < t <= b_{k+1}) the student's solution map f(x_t, t, s) = x_t + (s - t) F(x_t, t, s, c, w) learns to
jump to the segment's end s = b_k, trained by a consistency target one teacher step closer to it:

    j ~ U{1, ..., N},  k = floor((j - 1) S / N),  s = t_{kN/S},  j' = max(j - skip, kN/S)
    t = t_j,  t' = t_j',  w ~ U(w_min, w_max),  x_t = (1 - t) x0 + t x1
    x_t'   = x_t + (t' - t) (v_u + w (v_c - v_u))            one teacher Euler step with CFG (no grad)
             v_c = F_T(x_t, t, t, c, 0),  v_u = F_T(x_t, t, t, null, 0)
    target = f_sg(x_t', t', s, c, w) = x_t' + (s - t') F_sg   EMA student (LCM), exactly x_t' when t' = s
    loss_i = d(f(x_t, t, s, c, w), target),  d = mean over elements of the square (l2) or
             sqrt(mse + c^2) - c (LCM's pseudo-Huber)

f(x, s, s) = x holds by construction, so the boundary condition of every segment is exact. The student
samples with `segment`: x <- f(x, b_{k+1}, b_k, c, w) for k = S-1, ..., 0 (S NFE, w its guidance input).
Without a teacher (option teacher = "", the registry's generic tests) the teacher step is the one-sample
velocity x1 - x0 (consistency training, Song et al. 2023) and w = 1.

attn-distill: attention distillation (Efficient-vDiT Stage 3, "knowledge distillation"; Fig. 7 "attention
distill"). A student with sparse attention learns, on FM-noised samples, every block's self-attention
output and the final velocity of the dense teacher:

    L = attention_weight * mean_l mse(a_l^S, a_l^T) + output_weight * mse(F^S, F^T)

a_l the output of block l's self-attention module (the teacher's gathered at the student's kept tokens
when the student drops tokens). Without a teacher it is plain flow matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from eflow.api import (
    AttentionRecorder,
    Condition,
    ForwardCost,
    LossOutput,
    Objective,
    StepInfo,
    Teacher,
    batch_share,
    expand_like,
    guided_velocity,
    hookimpl,
    load_teacher,
    logit_normal,
    per_sample_mse,
    rand,
    randn,
    shift_time,
    validated_options,
)

TEACHER_HELP = (
    "the teacher's run directory (a flow-matching run, loaded frozen with its EMA weights); "
    "'' = no teacher (the generic fallback named in the module docstring)"
)


class TeacherOptions(BaseModel):
    """The options of a distillation objective that name its teacher (the first of `mlcd`'s and
    `attn-distill`'s options)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field("", description=TEACHER_HELP)
    teacher_weights: Literal["ema", "model"] = Field("ema", description="the teacher's EMA or online weights")


class TeacherSlot:
    """The frozen teacher of an objective: given as a module, or loaded on first use from a run directory
    onto the batch's device; the first batch is checked against it (latent channels, condition kind)."""

    def __init__(self, path: str, weights: str, model: nn.Module | None, owner: str):
        self.path, self.weights, self.owner = path, weights, owner
        self.model = model
        self.teacher: Teacher | None = None
        self.checked = model is not None

    def get(self, x0: Tensor, cond: Condition) -> nn.Module | None:
        if self.model is None and self.path:
            self.teacher = load_teacher(self.path, x0.device, self.weights)
            self.model = self.teacher.model
        if not self.checked and self.teacher is not None:
            self.teacher.check_batch(x0, cond, f"objective '{self.owner}': teacher {self.path}")
            self.checked = True
        return self.model


# ----- mlcd ---------------------------------------------------------------------------------------


class MLCDOptions(TeacherOptions):
    """Options of the `mlcd` objective."""

    segments: int = Field(
        4, ge=1, description="S, segments of the trajectory = sampling steps (Efficient-vDiT; Heek et al.)"
    )
    teacher_steps: int = Field(
        48,
        ge=1,
        description="N, Euler steps of the teacher over [0, 1] (a multiple of segments); LCM's DDIM grid has "
        "50 (1000 timesteps, skipping step 20)",
    )
    skip: int = Field(
        1, ge=1, description="k, grid steps per teacher ODE step (LCM's skipping step, in units of t_j)"
    )
    shift: float = Field(
        3.0, gt=0, description="shift of the grid t_j = shift_time(j / N); 3 = the fm teacher's euler grid"
    )
    w_min: float = Field(
        4.0, ge=0, description="CFG scale of the teacher step, w ~ U(w_min, w_max) per sample (LCM's w-range)"
    )
    w_max: float = Field(4.0, ge=0, description="upper end of the CFG scale; EFlow's inference w = 4.0")
    target: Literal["ema", "online"] = Field(
        "ema",
        description="weights of the consistency target f_sg: the EMA student (LCM) or online under no_grad",
    )
    loss: Literal["l2", "huber"] = Field(
        "l2", description="distance d: mean squared error, or LCM's pseudo-Huber sqrt(mse + c^2) - c"
    )
    huber_c: float = Field(0.001, gt=0, description="c of the pseudo-Huber distance (LCM: 0.001)")

    @model_validator(mode="after")
    def _check(self) -> MLCDOptions:
        if self.teacher_steps % self.segments:
            raise ValueError(
                f"teacher_steps ({self.teacher_steps}) must be a multiple of segments ({self.segments}), so "
                "every segment boundary is a grid point"
            )
        if self.w_max < self.w_min:
            raise ValueError(f"w_max ({self.w_max}) must be >= w_min ({self.w_min})")
        return self


@dataclass
class MLCDDraws:
    """The random quantities of one MLCD step: noise x1 [B, ...], grid indices j [B] in 1..N, CFG scales w [B]."""

    x1: Tensor
    j: Tensor
    w: Tensor


def segment_times(j: Tensor, teacher_steps: int, segments: int, skip: int, shift: float):
    """float64 (t, t', s) [B] of grid indices j [B] in 1..N: t = t_j, its teacher step's end t' =
    t_max(j - skip, lo) and the segment's end s = t_lo, lo = floor((j - 1) S / N) N / S."""
    n, per = teacher_steps, teacher_steps // segments
    lo = torch.div(j - 1, per, rounding_mode="floor") * per
    j_prev = torch.maximum(j - skip, lo)
    grid = lambda i: shift_time(i.double() / n, shift)  # noqa: E731
    return grid(j), grid(j_prev), grid(lo)


class MLCD(Objective):
    """Multi-step latent consistency distillation: 1 student pass with grad, 1 target pass, 2 teacher passes."""

    default_sampler = "segment"

    def __init__(self, *, total_steps: int, teacher_model: nn.Module | None = None, **options: Any):
        self.options: MLCDOptions = validated_options(MLCDOptions, options, "mlcd")
        self.total_steps = total_steps
        self.teacher = TeacherSlot(self.options.teacher, self.options.teacher_weights, teacher_model, "mlcd")

    def boundaries(self) -> Tensor:
        """[S + 1] float64 segment ends b_0 = 0 < ... < b_S = 1 (what `segment` visits, in reverse)."""
        k = torch.arange(self.options.segments + 1, dtype=torch.float64)
        return shift_time(k / self.options.segments, self.options.shift)

    def draw(
        self, x0: Tensor, generator: torch.Generator | None = None, info: StepInfo | None = None
    ) -> MLCDDraws:
        """Teacher step, guidance scale and noise per sample: drawn for the step's global batch, this rank's
        rows kept (StepInfo.share)."""
        o, (n, mine) = self.options, batch_share(info, x0.shape[0])
        j = (rand(n, generator, x0.device) * o.teacher_steps).long().clamp(max=o.teacher_steps - 1) + 1
        w = o.w_min + (o.w_max - o.w_min) * rand(n, generator, x0.device)
        x1 = randn((n, *x0.shape[1:]), generator, x0.device).to(x0.dtype)
        return MLCDDraws(x1[mine], j[mine], w[mine])

    def uses_ema(self, info: StepInfo) -> bool:
        return self.options.target == "ema"  # the consistency target's weights

    def loss(self, net, batch: dict, info: StepInfo) -> LossOutput:
        """batch = {"x0": [B, C, T, H, W], "cond": Condition, optional "generator"}."""
        draws = self.draw(batch["x0"], batch.get("generator"), info)
        return self.loss_from(net, batch["x0"], batch["cond"], draws)

    def loss_from(self, net, x0: Tensor, cond: Condition, d: MLCDDraws) -> LossOutput:
        """The MLCD loss for explicit draws (the equations of the module docstring)."""
        o = self.options
        dtype = torch.promote_types(x0.dtype, torch.float32)
        times = segment_times(d.j, o.teacher_steps, o.segments, o.skip, o.shift)  # float64
        reached = times[1] == times[2]  # [B] the teacher step ends on the segment's end: t' = s
        t, t_prev, s = (v.to(dtype) for v in times)
        tx = expand_like(t, x0).to(x0.dtype)
        x_t = (1 - tx) * x0 + tx * d.x1
        teacher = self.teacher.get(x0, cond)
        w = d.w.to(dtype) if teacher is not None else torch.ones_like(t)
        with torch.no_grad():
            if teacher is None:
                v = d.x1 - x0
            else:
                cfg_off = o.w_min == o.w_max == 1  # w = 1 is the conditional velocity alone
                v = guided_velocity(teacher, x_t, t, cond, None if cfg_off else w)
                net.counts["full_nograd"] += x0.shape[0] * (1 if cfg_off else 2)  # teacher passes
            x_prev = x_t + expand_like(t_prev - t, x_t).to(x_t.dtype) * v.to(x_t.dtype)
            target = net.solution(x_prev, t_prev, s, cond, w, target="ema" if o.target == "ema" else "sg")
            at_end = expand_like(reached, target)
            target = torch.where(at_end, x_prev.to(target.dtype), target)  # f(x, s, s) = x, whatever F is
        pred = net.solution(x_t, t, s, cond, w)
        mse = per_sample_mse(pred, target)
        err = (mse + o.huber_c**2).sqrt() - o.huber_c if o.loss == "huber" else mse
        loss = err.mean()
        return LossOutput(
            loss,
            {
                "loss": loss.detach(),
                "mse": mse.detach().mean(),
                "w": w.detach().mean(),
                "t": t.detach().mean(),
                "at_boundary": reached.float().mean(),
            },
        )

    def cost(self, mva_share: float = 0.0) -> ForwardCost:
        """Per sample: the student with grad; the target (EMA or online) and 2 teacher passes (cond + null,
        1 when w is fixed at 1, none without a teacher) without."""
        o = self.options
        teacher = (
            0.0 if not o.teacher and self.teacher.model is None else (1.0 if o.w_min == o.w_max == 1 else 2.0)
        )
        return ForwardCost(full_grad=1.0, full_nograd=1.0 + teacher)


# ----- attn-distill -------------------------------------------------------------------------------


class AttnDistillOptions(TeacherOptions):
    """Options of the `attn-distill` objective."""

    attention_weight: float = Field(
        1.0, ge=0, description="weight of the per-layer attention-output term (Efficient-vDiT Stage 3)"
    )
    output_weight: float = Field(1.0, ge=0, description="weight of the final-velocity term ||F_S - F_T||^2")
    mu_t: float = Field(0.0, description="logit-normal mean of t (as fm; EFlow Table 5)")
    sigma_t: float = Field(1.0, gt=0, description="logit-normal std of t (as fm)")
    shift_t: float = Field(3.0, gt=0, description="time shift of t (as fm)")
    label_dropout: float = Field(
        0.1, ge=0, le=1, description="null-condition share, so the unconditional velocity is distilled too"
    )


class AttentionDistillation(Objective):
    """Per-layer attention-output and final-output matching of a sparse student to a dense teacher."""

    default_sampler = "euler"

    def __init__(self, *, total_steps: int, teacher_model: nn.Module | None = None, **options: Any):
        self.options: AttnDistillOptions = validated_options(AttnDistillOptions, options, "attn-distill")
        self.total_steps = total_steps
        self.teacher = TeacherSlot(
            self.options.teacher, self.options.teacher_weights, teacher_model, "attn-distill"
        )

    def uses_ema(self, info: StepInfo) -> bool:
        return False  # the teacher's passes, never the EMA's

    def loss(self, net, batch: dict, info: StepInfo) -> LossOutput:
        o, x0, cond, generator = self.options, batch["x0"], batch["cond"], batch.get("generator")
        b = x0.shape[0]
        n, mine = info.share(b)  # the step's global batch drawn, this rank's rows kept
        t = logit_normal(n, o.mu_t, o.sigma_t, o.shift_t, generator, x0.device)[mine]
        x1 = randn((n, *x0.shape[1:]), generator, x0.device).to(x0.dtype)[mine]
        cond = cond.drop((rand(n, generator, x0.device) < o.label_dropout)[mine])
        t = t.to(torch.promote_types(x0.dtype, torch.float32))
        tx = expand_like(t, x0).to(x0.dtype)
        x_t = (1 - tx) * x0 + tx * x1
        zeros = torch.zeros_like(t)
        teacher = self.teacher.get(x0, cond)
        if teacher is None:  # plain flow matching
            err = per_sample_mse(net(x_t, t, t, cond, zeros, path="full"), x1 - x0)
            loss = err.mean()
            return LossOutput(loss, {"loss": loss.detach(), "output_mse": err.detach().mean()})
        with torch.no_grad(), AttentionRecorder(teacher) as taught:
            F_t = teacher(x_t, t, t, cond, zeros, path="full")
        net.counts["full_nograd"] += b  # the teacher's pass
        with AttentionRecorder(net.model) as learned:
            F_s = net(x_t, t, t, cond, zeros, path="full")
        layers = [
            per_sample_mse(s.out, gather_tokens(a.out, s.index))
            for s, a in zip(learned.outputs(), taught.outputs(), strict=True)
        ]
        attn = torch.stack(layers).mean(dim=0)  # [B]
        out = per_sample_mse(F_s, F_t)
        loss = (o.attention_weight * attn + o.output_weight * out).mean()
        return LossOutput(
            loss,
            {"loss": loss.detach(), "attention_mse": attn.detach().mean(), "output_mse": out.detach().mean()},
        )

    def cost(self, mva_share: float = 0.0) -> ForwardCost:
        """The student with grad and, with a teacher, one teacher pass without."""
        has_teacher = bool(self.options.teacher) or self.teacher.model is not None
        return ForwardCost(full_grad=1.0, full_nograd=1.0 if has_teacher else 0.0)


def gather_tokens(dense: Tensor, index: Tensor) -> Tensor:
    """[B, N, D] outputs on all tokens -> [B, M, D] at raster indices [B, M] (identity when M = N)."""
    if index.shape[1] == dense.shape[1]:
        return dense
    return dense.gather(1, index.to(dense.device)[..., None].expand(-1, -1, dense.shape[-1]))


@hookimpl
def register_objectives(register):
    register(
        "mlcd",
        MLCD,
        summary="Efficient-vDiT MLCD: consistency distillation of an fm teacher's CFG trajectory in S segments; "
        "sample with segment",
        options=MLCDOptions,
        default_sampler="segment",
        same_calls_every_rank=True,
        trained_sampling=True,
    )
    register(
        "attn-distill",
        AttentionDistillation,
        summary="Efficient-vDiT attention distillation: match each layer's attention and the output of a dense "
        "teacher; sample with euler",
        options=AttnDistillOptions,
        default_sampler="euler",
        same_calls_every_rank=True,
    )
