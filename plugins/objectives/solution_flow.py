"""Solution flow matching (SoFlow) with EFlow's Path-Drop Guidance and Mean-Velocity Additivity.

The network parameterizes the bi-time solution map f(x_t, t, s, c, w) = x_t + (s - t) F(x_t, t, s, c, w)
(t = 0 data, t = 1 noise, s < t cleaner). One batch of clean samples x0 is split into disjoint groups
(EFlow Algorithm 1):

  FM  (share a'):  || F(x_t, t, t, c, w) - v_g ||^2, adaptively weighted
  SCM (share b'):  w_SCM || f(x_t, t, s) - f_sg(x_t + v_mix (l - t), l, s) ||^2
  MVA (share m):   || f(x_t, t, s) - f_sg(f_sg(x_t, t, l), l, s) ||^2 on grid times t > l > s

with the CFG-folded target v_g = v + d(t) (w - 1) (v - v_u), v = x1 - x0, and v_mix = mix v_g + (1 - mix) F_sg(x_t, t, t, c, w).
`sfm` takes v_u from a full no-grad pass F(x_t, t, t, null); `pdg-sfm` from the cheap weak path
(middle stack skipped, EFlow Eq. 11), and trains that weak path on path-dropped FM samples.

Exact conventions (where the paper and the notes leave room):
- shares: m = StepInfo.mva_share when option `mva` is on, else 0; a' = a (1 - m) / (a + b) and
  b' = b (1 - m) / (a + b), i.e. fm_ratio : scm_ratio is kept and FM + SCM fill 1 - m.
  Group sizes: n_fm = round(a' B), n_scm = round((a' + b') B) - n_fm, n_mva = B - n_fm - n_scm,
  members chosen by a random permutation of the batch.
- dropping (Algorithm 1, lines 7-8): only FM samples drop their label. `pdg-sfm`: with probability p_drop
  the sample takes the null condition, guidance 0 and the weak path (with gradient) and trains plain
  unconditional FM, || F_weak(x_t, t, t, null, 0) - v ||^2. `sfm`: with probability label_dropout the sample
  takes the null condition and guidance 0 on the full path and trains || F(x_t, t, t, null, 0) - v ||^2.
  The unconditional velocity is always queried with guidance 0 to match (w = 0 in Eq. 11 is the
  unconditional field). Samples whose label is null use the plain v instead of v_g and get guidance 0.
- the velocity mix: the SCM step x_l uses v_mix; guided FM samples regress mix v_g + (1 - mix) F_sg with
  F_sg the detached output of their own gradient pass, as SoFlow's code does (option `mix_fm_target`). It
  costs no pass and leaves the gradient's direction alone, but scales the error by mix, which raises FM's
  adaptive weight 1 / (mix^2 e + eps)^p against SCM's (about 3.5x at e = 1 with the defaults).
- loss normalization: loss = (1 / B) sum_i loss_i over the whole batch, which is
  (n_fm / B) L_FM + (n_scm / B) L_SCM + (n_mva / B) L_MVA with each L the mean over its group,
  i.e. a L_FM + b L_SCM + (1 - a - b) L_MVA with the realized group fractions.
- reading order: `plan_groups` says which samples take which passes (the index sets), `loss_from` computes
  the equations on those sets with batched passes, and `reference_loss` is Algorithm 1 one sample and
  one network call at a time: the readable ground truth the batched version is tested against.
- token dropping: every pass names its samples' global rows and its place in the step (pass_id 0-8),
  so a sample's kept tokens do not depend on the rank or on the passes sharing its call.
- batching: passes without mutual dependence are concatenated into one network call per
  (path, weights): stage 1 (no grad) = {v_u for FM and SCM samples, F_sg(x_t, t, t, c) for SCM, the first MVA leg},
  stage 2 (no grad) = {SCM target, second MVA leg}, and one call with gradient for all full-path
  FM/SCM/MVA predictions plus (pdg-sfm) one weak call with gradient for the path-dropped samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from eflow.api import (
    Condition,
    ConfigError,
    ForwardCost,
    LossOutput,
    Objective,
    StepInfo,
    adaptive_weight,
    expand_like,
    hookimpl,
    intermediate_time,
    l_ratio,
    logit_normal,
    mva_grid,
    per_sample_mse,
    rand,
    randn,
    rows_in,
    sample_mva_triplets,
    sample_scm_times,
    solution_map,
    validated_options,
)

# ----------------------------------------------------------------------------------------------------
# options


class SolutionFlowOptions(BaseModel):
    """Options shared by `sfm` and `pdg-sfm`."""

    model_config = ConfigDict(extra="forbid")

    fm_ratio: float = Field(
        0.75,
        ge=0,
        le=1,
        description="a, the FM share of the batch; EFlow C.1 Kinetics [0.75, 0.25], SoFlow 75%",
    )
    scm_ratio: float = Field(
        0.25, ge=0, le=1, description="b, the SCM share of the batch; EFlow C.1 Kinetics [0.75, 0.25]"
    )
    mva: bool = Field(
        False,
        description="Mean-Velocity Additivity term (EFlow 4.2b); its share comes from the trainer's stage schedule "
        "(StepInfo.mva_share; Kinetics: 0 for the first 80%, on for the last 20%, EFlow C.1)",
    )
    mu_t: float = Field(
        0.0, description="logit-normal mean of t; EFlow Table 5 (mu_t, sigma_t, shift_t) = (0, 1, 3)"
    )
    sigma_t: float = Field(1.0, gt=0, description="logit-normal std of t; EFlow Table 5")
    shift_t: float = Field(3.0, gt=0, description="time shift of t; EFlow Table 5")
    mu_s: float = Field(
        -1.0, description="logit-normal mean of s; EFlow Table 5 (mu_s, sigma_s, shift_s) = (-1, 0.8, 1)"
    )
    sigma_s: float = Field(0.8, gt=0, description="logit-normal std of s; EFlow Table 5")
    shift_s: float = Field(1.0, gt=0, description="time shift of s; EFlow Table 5")
    r0: float = Field(
        1.0,
        gt=0,
        le=1,
        description="(t - l) / (t - s) at step 0 of the exponential l - t schedule; 1 = the SCM target starts as "
        "one Euler jump to s (learns faster in short runs, docs/results.md); SoFlow ImageNet 0.1",
    )
    r1: float = Field(0.002, gt=0, le=1, description="(t - l) / (t - s) at the last step; SoFlow ImageNet")
    p: float = Field(
        1.0, ge=0, description="adaptive-weight power; EFlow Table 5 'loss weight coefficient' 1.0"
    )
    eps: float = Field(0.01, gt=0, description="adaptive-weight stabilizer; SoFlow ImageNet config 0.01")
    w_min: float = Field(2.5, ge=0, description="guidance scale w ~ U(w_min, w_max) per batch; EFlow Table 5")
    w_max: float = Field(4.5, ge=0, description="upper end of the training guidance range; EFlow Table 5")
    cfg_decay_time: float = Field(
        0.8,
        gt=0,
        le=1,
        description="guidance fades linearly from t = this to 0 at t = 1; SoFlow cfg_decay_time",
    )
    velocity_mix: float = Field(
        0.25,
        ge=0,
        le=1,
        description="v_mix = mix v_g + (1 - mix) F_sg(x_t, t, t, c); EFlow Table 5 / SoFlow 0.25",
    )
    scm_start: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of the run trained without SCM (its share goes to FM) before SCM starts; "
        "0 = SCM from the first step (SoFlow, EFlow)",
    )
    mix_fm_target: bool = Field(
        True,
        description="FM regresses mix v_g + (1 - mix) F_sg too, F_sg the detached F of the same pass (SoFlow's "
        "code; no extra pass): the error is scaled by mix, which sets FM's adaptive weight against SCM's",
    )
    guidance_target: Literal["sample", "self"] = Field(
        "sample",
        description="the CFG-folded FM target: 'sample' = v + k (v - v_u) (EFlow Eq. 9/11, SoFlow), k = d(t) (w - 1); "
        "'self' = v + k / (1 + k) (F_sg - v_u) with F_sg the detached guided prediction at the same point (no "
        "extra pass): the same fixed point, with the sample noise of v not amplified by (1 + k) (docs/results.md)",
    )
    target: Literal["online", "ema"] = Field(
        "online", description="weights of the SCM target f_sg: online under no_grad (SoFlow) or the EMA copy"
    )
    mva_target: Literal["online", "ema"] = Field(
        "ema",
        description="weights of the two MVA target passes; EFlow 4.2b speaks of 'two extra EMA forward passes'",
    )
    mva_grid_points: int = Field(64, ge=3, description="MVA's discrete time grid size K; EFlow B.2 (K = 64)")
    mva_grid_shift: float = Field(3.0, gt=0, description="shift of the MVA grid; EFlow B.2 (shift = 3)")

    @model_validator(mode="after")
    def _check(self):
        a, b = self.fm_ratio, self.scm_ratio
        if a + b > 1 + 1e-9:
            raise ConfigError(
                f"fm_ratio + scm_ratio must be <= 1 (got {a} + {b}); the MVA share is 1 - fm_ratio - scm_ratio "
                "in Algorithm 1 (here set per stage by StepInfo.mva_share, FM and SCM rescaled to fill the rest)"
            )
        if a + b <= 0:
            raise ConfigError("fm_ratio + scm_ratio must be > 0 (got 0 + 0): FM and SCM cannot both be off")
        if self.w_min > self.w_max:
            raise ConfigError(f"w_min must be <= w_max (got w_min={self.w_min}, w_max={self.w_max})")
        if self.r1 > self.r0:
            raise ConfigError(
                f"r1 must be <= r0 for a decaying l - t schedule (got r0={self.r0}, r1={self.r1})"
            )
        return self


class SFMOptions(SolutionFlowOptions):
    """Options of `sfm` (SoFlow with a full unconditional pass for the CFG target)."""

    label_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="probability an FM sample trains unconditionally on the full path; SoFlow 0.1",
    )


class PDGSFMOptions(SolutionFlowOptions):
    """Options of `pdg-sfm` (EFlow: the unconditional velocity from the weak path)."""

    p_drop: float = Field(
        0.2,
        ge=0,
        le=1,
        description="probability an FM sample trains the weak path unconditionally; EFlow B.2 p_drop = 0.2",
    )


# ----------------------------------------------------------------------------------------------------
# the equations


def straight_path(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1 with t [B]."""
    t = expand_like(t.to(x0.dtype), x0)
    return (1 - t) * x0 + t * x1


def cfg_decay(t: Tensor, decay_time: float) -> Tensor:
    """[B] d(t) = 1 for t <= decay_time, falling linearly to 0 at t = 1 (SoFlow's CFG decay)."""
    if decay_time >= 1:
        return torch.ones_like(t)
    return ((1 - t) / (1 - decay_time)).clamp(0.0, 1.0)


def guided_velocity(v: Tensor, v_uncond: Tensor, w: Tensor, t: Tensor, decay_time: float) -> Tensor:
    """v_g = v + d(t) (w - 1) (v - v_u): w v + (1 - w) v_u where d = 1 (EFlow Eq. 9/11); w, t [B]."""
    k = expand_like((cfg_decay(t, decay_time) * (w - 1)).to(v.dtype), v)
    return v + k * (v - v_uncond)


def self_guided_velocity(
    v: Tensor, F_guided: Tensor, v_uncond: Tensor, w: Tensor, t: Tensor, decay_time: float
) -> Tensor:
    """v + k / (1 + k) (F_sg - v_u), k = d(t) (w - 1), F_sg the detached guided prediction F(x_t, t, t, c, w).

    Where F_sg equals the guided velocity (1 + k) E[v] - k v_u, this equals E[v] + k (E[v] - v_u) + (v - E[v]):
    the target of guided_velocity, but with the per-sample noise v - E[v] kept at its FM size instead of
    scaled by 1 + k (3.5 to 5.5 for w in [2.5, 4.5]). Regressing F on it converges to that fixed point (the
    map F -> target contracts by k / (1 + k) < 1). w, t [B].
    """
    k = cfg_decay(t, decay_time) * (w - 1)
    k = expand_like((k / (1 + k)).to(v.dtype), v)
    return v + k * (F_guided - v_uncond)


def scm_loss(f_t: Tensor, f_l: Tensor, t: Tensor, l: Tensor, s: Tensor, p: float, eps: float) -> Tensor:
    """[B] SoFlow's SCM loss: || f_t - f_l ||^2 / ((t - l)(t - s)) times 1 / (e_fd + eps)^p (detached),
    e_fd the per-element mean of the finite-difference residual ((f_t - f_l) / (t - l))^2.

    f_t - f_l ~ (t - l) R with R the PDE residual and d f_t / dtheta = (s - t) dF / dtheta, so the gradient of
    || f_t - f_l ||^2 / ((t - l)(t - s)) is ~ -2 R dF / dtheta: O(1) in both gaps, like a residual loss on F.
    Weighting by 1 / (t - l)^2 instead would scale that gradient by (t - s) / (t - l) = 1 / r(step): up to
    500x at the end of SoFlow's schedule (r1 = 0.002), and larger for the long jumps, blowing up the
    effective learning rate as l -> t instead of converging to the continuous-time objective.
    """
    err = per_sample_mse(f_t, f_l)
    tl, ts = (t - l).to(err.dtype), (t - s).to(err.dtype)
    return adaptive_weight(err / tl**2, p, eps) * err / (tl * ts)


def mva_loss(f_direct: Tensor, f_composed: Tensor) -> Tensor:
    """[B] || f(x_t, t, s) - f_sg(f_sg(x_t, t, l), l, s) ||^2 per-element mean (EFlow Eq. 12, unweighted)."""
    return per_sample_mse(f_direct, f_composed)


# ----------------------------------------------------------------------------------------------------
# batched forward passes


@dataclass
class Pass:
    """One request for F on a subset of samples (a tensor per field, batch first)."""

    x: Tensor
    t: Tensor
    s: Tensor
    cond: Condition
    guidance: Tensor
    path: str = "full"
    weights: str = "online"  # "online" or "ema"
    rows: Tensor | None = None  # [n] long, the samples' rows in the step's global batch
    pass_id: int = 0  # which of the step's passes this is: with `rows`, the key of its token-drop draw


def run_passes(net, passes: list[Pass], grad: bool) -> list[Tensor]:
    """F for every pass, with one network call per (path, weights): their samples are concatenated, each
    keeping its own token-drop key (rows, pass_id) when every pass of the call has rows."""
    out: list[Tensor | None] = [None] * len(passes)
    calls: dict[tuple[str, str], list[int]] = {}
    for i, q in enumerate(passes):
        if len(q.x) == 0:
            out[i] = q.x.new_zeros(q.x.shape)
        else:
            calls.setdefault((q.path, q.weights), []).append(i)
    for (path, weights), ids in calls.items():
        x = torch.cat([passes[i].x for i in ids])
        t = torch.cat([passes[i].t for i in ids])
        s = torch.cat([passes[i].s for i in ids])
        g = torch.cat([passes[i].guidance for i in ids])
        cond = Condition.cat([passes[i].cond for i in ids])
        keyed = all(passes[i].rows is not None for i in ids)
        rows = torch.cat([passes[i].rows for i in ids]) if keyed else None  # type: ignore[misc]
        pass_id = (
            torch.cat([torch.full((len(passes[i].x),), passes[i].pass_id) for i in ids]) if keyed else None
        )
        if weights == "ema":
            F = net.ema(x, t, s, cond, g, path=path, rows=rows, pass_id=pass_id)
        else:
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                F = net(x, t, s, cond, g, path=path, rows=rows, pass_id=pass_id)
        F = F.to(
            torch.promote_types(F.dtype, x.dtype)
        )  # low-precision outputs: keep f = x + (s - t) F in x's dtype
        for i, part in zip(ids, F.split([len(passes[i].x) for i in ids]), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# the objective


@dataclass
class SFMDraws:
    """The random quantities of one step. Per-sample times [B] mean, by group: FM t (s = l = t);
    SCM t > l >= s; MVA grid times t > l > s. `dropped` [B] is only ever True inside the FM group."""

    x1: Tensor  # [B, ...] noise
    fm: Tensor  # [n_fm] long, batch indices of the FM group
    scm: Tensor  # [n_scm] long
    mva: Tensor  # [n_mva] long
    t: Tensor
    l: Tensor
    s: Tensor
    w: float  # guidance scale of this batch
    dropped: Tensor  # [B] bool


@dataclass
class Groups:
    """Which samples take which passes (EFlow Algorithm 1), as batch-index sets [n] long.

    full_fm: FM samples trained on the full path (all FM samples for sfm; the kept ones for pdg-sfm);
    weak_fm: pdg-sfm's path-dropped FM samples, trained unconditionally on the weak path;
    guided:  samples whose target folds CFG in, v_g (kept FM and SCM samples with a non-null condition);
    scm, mva: the SCM and MVA groups.
    """

    full_fm: Tensor
    weak_fm: Tensor
    guided: Tensor
    scm: Tensor
    mva: Tensor


def plan_groups(d: SFMDraws, null: Tensor, pdg: bool) -> Groups:
    """The index sets of one step from its draws; null [B] bool marks samples with the null condition."""
    dropped_fm = d.dropped[d.fm]
    fm_drop, fm_keep = d.fm[dropped_fm], d.fm[~dropped_fm]
    guided = torch.cat([fm_keep, d.scm])
    return Groups(
        full_fm=fm_keep if pdg else d.fm,
        weak_fm=fm_drop if pdg else fm_drop[:0],
        guided=guided[~null[guided]],
        scm=d.scm,
        mva=d.mva,
    )


def group_sizes(batch: int, shares: tuple[float, float, float]) -> tuple[int, int, int]:
    """(n_fm, n_scm, n_mva) by rounding the cumulative shares, so they sum to the batch size."""
    a, b, _ = shares
    n_fm = min(batch, round(a * batch))
    n_fm_scm = min(batch, round((a + b) * batch))
    return n_fm, n_fm_scm - n_fm, batch - n_fm_scm


class SolutionFlow(Objective):
    """`sfm` (pdg=False) and `pdg-sfm` (pdg=True): FM + SCM (+ MVA) on disjoint parts of each batch."""

    def __init__(self, *, total_steps: int, pdg: bool = False, **options: Any):
        self.pdg = pdg
        self.name = "pdg-sfm" if pdg else "sfm"
        model = PDGSFMOptions if pdg else SFMOptions
        self.options = validated_options(model, options, self.name)
        self.total_steps = total_steps
        self.drop_prob = self.options.p_drop if pdg else self.options.label_dropout
        self.grid = mva_grid(self.options.mva_grid_points, self.options.mva_grid_shift)

    # -- the batch split ---------------------------------------------------------------------------
    def shares(self, mva_share: float = 0.0, step: int | None = None) -> tuple[float, float, float]:
        """(a', b', m): m = mva_share if option `mva` is on (else 0); FM : SCM = fm_ratio : scm_ratio fill 1 - m.
        Before `scm_start` of the run (when `step` is given) SCM's share goes to FM."""
        m = float(mva_share) if self.options.mva else 0.0
        if not 0.0 <= m < 1.0:
            raise ConfigError(f"mva_share must be in [0, 1) (got {m})")
        a, b = self.options.fm_ratio, self.options.scm_ratio
        if step is not None and step < self.options.scm_start * self.total_steps:
            a, b = a + b, 0.0
        k = (1.0 - m) / (a + b)
        return a * k, b * k, m

    def effective_mva_share(self, mva_share: float) -> float:
        """m of `shares`: the scheduled share when option `mva` is on, else 0."""
        return self.shares(mva_share)[2]

    def uses_ema(self, info: StepInfo) -> bool:
        """The SCM target from the EMA (option target), or MVA on in this stage with its EMA targets."""
        o = self.options
        return o.target == "ema" or (o.mva_target == "ema" and self.effective_mva_share(info.mva_share) > 0)

    def draw(self, x0: Tensor, info: StepInfo, generator: torch.Generator | None = None) -> SFMDraws:
        """Groups, noise, times, guidance scale and drop draws for a batch x0 [B, ...]: drawn for the step's
        global batch of N rows (the groups split those N), this rank's rows kept (StepInfo.share)."""
        o, dev = self.options, x0.device
        B, mine = info.share(x0.shape[0])
        n_fm, n_scm, _ = group_sizes(B, self.shares(info.mva_share, info.step))
        perm = rand(B, generator, dev).argsort()
        fm, scm, mva = perm[:n_fm], perm[n_fm : n_fm + n_scm], perm[n_fm + n_scm :]
        x1 = randn((B, *x0.shape[1:]), generator, dev).to(x0.dtype)
        # every time sampler draws for the whole batch so RNG use does not depend on the split
        t = logit_normal(B, o.mu_t, o.sigma_t, o.shift_t, generator, dev)
        t_scm, s_scm = sample_scm_times(
            B, o.mu_t, o.sigma_t, o.shift_t, o.mu_s, o.sigma_s, o.shift_s, generator, dev
        )
        l_scm = intermediate_time(t_scm, s_scm, info.step, self.total_steps, o.r0, o.r1)
        t_mva, l_mva, s_mva = sample_mva_triplets(B, self.grid.to(dev), generator)
        s, l = t.clone(), t.clone()
        for idx, (ti, li, si) in ((scm, (t_scm, l_scm, s_scm)), (mva, (t_mva, l_mva, s_mva))):
            t[idx], l[idx], s[idx] = ti[idx], li[idx], si[idx]
        w = o.w_min + (o.w_max - o.w_min) * rand(1, generator, dev).item()
        in_fm = torch.zeros(B, dtype=torch.bool, device=dev)
        in_fm[fm] = True
        dropped = (rand(B, generator, dev) < self.drop_prob) & in_fm
        fm, scm, mva = (rows_in(group, mine) for group in (fm, scm, mva))
        return SFMDraws(x1[mine], fm, scm, mva, t[mine], l[mine], s[mine], w, dropped[mine])

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, net, batch: dict, info: StepInfo) -> LossOutput:
        """batch = {"x0": [B, C, T, H, W], "cond": Condition, optional "generator"}."""
        x0 = batch["x0"]
        return self.loss_from(net, x0, batch["cond"], self.draw(x0, info, batch.get("generator")), info)

    def loss_from(
        self, net, x0: Tensor, cond: Condition, d: SFMDraws, info: StepInfo | None = None
    ) -> LossOutput:
        """The loss for explicit draws (tests call this with hand-picked times)."""
        o, B = self.options, x0.shape[0]
        tdtype = torch.promote_types(x0.dtype, torch.float32)  # times stay >= float32: t - l can be ~1e-4
        t, l, s = d.t.to(tdtype), d.l.to(tdtype), d.s.to(tdtype)
        x_t = straight_path(x0, d.x1, t)
        v = d.x1 - x0
        cond = cond.drop(d.dropped)
        null = cond.is_null()
        g = torch.where(null, torch.zeros_like(t), torch.full_like(t, d.w))  # the model's guidance input
        null_cond = cond.null()

        groups = plan_groups(d, null, self.pdg)
        full_fm, weak_fm, guided, scm, mva = (
            groups.full_fm,
            groups.weak_fm,
            groups.guided,
            groups.scm,
            groups.mva,
        )

        start = 0 if info is None else info.batch_start  # global row of local row 0 (token-drop keys)

        def at(idx: Tensor, x: Tensor, tt: Tensor, ss: Tensor, c: Condition, gg: Tensor, **kw) -> Pass:
            return Pass(x[idx], tt[idx], ss[idx], c[idx], gg[idx], rows=idx + start, **kw)

        # stage 1 (no grad): v_u for guided FM/SCM samples, F_sg(x_t, t, t, c) for SCM, first MVA leg
        uncond_path = "weak" if self.pdg else "full"
        mix = o.velocity_mix
        self_target = o.guidance_target == "self"
        stage1 = [
            at(guided, x_t, t, t, null_cond, torch.zeros_like(t), path=uncond_path, pass_id=0),
            at(scm if mix < 1 or self_target else scm[:0], x_t, t, t, cond, g, pass_id=1),
            at(mva, x_t, t, l, cond, g, weights=o.mva_target, pass_id=2),
        ]
        F_u, F_c, F_mva1 = run_passes(net, stage1, grad=False)

        v_g = v.clone()
        if self_target:  # v_g of the SCM samples now (F_c is their F_sg); of the FM samples after their pass
            v_u = torch.zeros_like(v)
            v_u[guided] = F_u
            F_sg = torch.zeros_like(v)
            F_sg[scm] = F_c
            scm_g = scm[~null[scm]]
            v_g[scm_g] = self_guided_velocity(
                v[scm_g], F_sg[scm_g], v_u[scm_g], g[scm_g], t[scm_g], o.cfg_decay_time
            )
        else:
            v_g[guided] = guided_velocity(v[guided], F_u, g[guided], t[guided], o.cfg_decay_time)
        v_mix = v_g[scm] if mix >= 1 else mix * v_g[scm] + (1 - mix) * F_c
        x_l = x_t[scm] + expand_like(l[scm] - t[scm], x_t) * v_mix
        x_mid = solution_map(x_t[mva], t[mva], l[mva], F_mva1)

        # stage 2 (no grad): the SCM target f_sg(x_l, l, s) and the second MVA leg f_sg(x_mid, l, s)
        stage2 = [
            Pass(x_l, l[scm], s[scm], cond[scm], g[scm], weights=o.target, rows=scm + start, pass_id=3),
            Pass(x_mid, l[mva], s[mva], cond[mva], g[mva], weights=o.mva_target, rows=mva + start, pass_id=4),
        ]
        F_l, F_mva2 = run_passes(net, stage2, grad=False)
        f_l = solution_map(x_l, l[scm], s[scm], F_l)
        f_mva = solution_map(x_mid, l[mva], s[mva], F_mva2)

        # with gradient: all full-path predictions in one call, path-dropped FM samples on the weak path
        grads = [
            at(full_fm, x_t, t, t, cond, g, pass_id=5),
            at(scm, x_t, t, s, cond, g, pass_id=6),
            at(mva, x_t, t, s, cond, g, pass_id=7),
            at(weak_fm, x_t, t, t, null_cond, torch.zeros_like(t), path="weak", pass_id=8),
        ]
        F_fm, F_scm, F_mva, F_weak = run_passes(net, grads, grad=True)

        if self_target:
            F_sg[full_fm] = F_fm.detach()
            fm_g = full_fm[~null[full_fm]]
            v_g[fm_g] = self_guided_velocity(
                v[fm_g], F_sg[fm_g], v_u[fm_g], g[fm_g], t[fm_g], o.cfg_decay_time
            )
        target_fm = v_g[full_fm]
        if o.mix_fm_target and mix < 1:  # SoFlow: mix the guided target with the pass's own detached F
            mixed = mix * target_fm + (1 - mix) * F_fm.detach()
            guided_fm = expand_like(~null[full_fm], target_fm)
            target_fm = torch.where(guided_fm, mixed, target_fm)  # label-dropped samples keep the plain v
        err_fm = per_sample_mse(torch.cat([F_fm, F_weak]), torch.cat([target_fm, v[weak_fm]]))
        loss_fm = adaptive_weight(err_fm, o.p, o.eps) * err_fm
        f_scm = solution_map(x_t[scm], t[scm], s[scm], F_scm)
        loss_scm = scm_loss(f_scm, f_l, t[scm], l[scm], s[scm], o.p, o.eps)
        loss_mva = mva_loss(solution_map(x_t[mva], t[mva], s[mva], F_mva), f_mva)

        loss = torch.cat([loss_fm, loss_scm, loss_mva]).sum() / B
        metrics = {"loss": loss.detach(), "w": d.w, "n_fm": len(d.fm), "n_scm": len(scm), "n_mva": len(mva)}
        metrics["n_drop"] = d.dropped.sum()
        metrics["mse_fm"] = err_fm.detach().mean()  # unweighted: the adaptive weight keeps loss_fm near 1
        for name, part in (("loss_fm", loss_fm), ("loss_scm", loss_scm), ("loss_mva", loss_mva)):
            if len(part):
                metrics[name] = part.detach().mean()
        if info is not None:
            metrics["l_ratio"] = l_ratio(info.step, self.total_steps, o.r0, o.r1)
        return LossOutput(loss, metrics)

    # -- the reference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_loss(self, net, x0: Tensor, cond: Condition, d: SFMDraws) -> Tensor:
        """Algorithm 1 one sample at a time, each pass its own network call: the ground truth of the
        batched `loss_from` (same draws, same value; tests check it). Returns the scalar loss []."""
        o, B = self.options, x0.shape[0]
        mix, uncond_path = o.velocity_mix, ("weak" if self.pdg else "full")
        group = {int(i): name for name, idx in (("fm", d.fm), ("scm", d.scm), ("mva", d.mva)) for i in idx}

        tdtype = torch.promote_types(x0.dtype, torch.float32)  # as loss_from: times stay >= float32

        def one(v: float) -> Tensor:  # a time or guidance scale as a [1] tensor
            return torch.tensor([v], device=x0.device, dtype=tdtype)

        def F(x, t, s, c, w, path="full", weights="online"):  # the network on one sample, times as floats
            call = net.ema if weights == "ema" else net
            out = call(x, one(t), one(s), c, one(w), path=path)
            return out.to(torch.promote_types(out.dtype, x.dtype))

        def f(x, t, s, c, w, weights="online"):  # the solution map f = x + (s - t) F
            return x + (s - t) * F(x, t, s, c, w, weights=weights)

        total = x0.new_zeros(())
        for i in range(B):
            t, l, s = (float(v[i]) for v in (d.t, d.l, d.s))
            x0_i, x1_i = x0[i : i + 1], d.x1[i : i + 1]
            x_t, v = (1 - t) * x0_i + t * x1_i, x1_i - x0_i
            c = cond[i : i + 1]
            if d.dropped[i]:
                c = c.null()
            null = bool(c.is_null()[0])
            w = 0.0 if null else d.w
            v_g = v  # the CFG-folded velocity (Eq. 9/11); the plain v for a null condition
            if not null and group[i] in ("fm", "scm"):
                v_u = F(x_t, t, t, c.null(), 0.0, uncond_path)
                k = float(cfg_decay(torch.tensor([t]), o.cfg_decay_time)) * (w - 1)
                if o.guidance_target == "self":  # from the detached guided prediction at the same point
                    v_g = v + k / (1 + k) * (F(x_t, t, t, c, w) - v_u)
                else:
                    v_g = v + k * (v - v_u)
            if group[i] == "fm":
                if d.dropped[i]:  # unconditional FM: on the weak path for pdg-sfm (Algorithm 1, l. 7-8)
                    err = per_sample_mse(F(x_t, t, t, c, 0.0, uncond_path), v)
                else:
                    F_c = F(x_t, t, t, c, w)
                    target = (
                        mix * v_g + (1 - mix) * F_c if (o.mix_fm_target and mix < 1 and not null) else v_g
                    )
                    err = per_sample_mse(F_c, target)
                total = total + (adaptive_weight(err, o.p, o.eps) * err)[0]
            elif group[i] == "scm":  # one step along the mixed velocity to l, then the target map to s
                v_mix = v_g if mix >= 1 else mix * v_g + (1 - mix) * F(x_t, t, t, c, w)
                x_l = x_t + (l - t) * v_mix
                f_t, f_l = f(x_t, t, s, c, w), f(x_l, l, s, c, w, weights=o.target)
                total = total + scm_loss(f_t, f_l, one(t), one(l), one(s), o.p, o.eps)[0]
            else:  # MVA: the direct jump t -> s against the composed one t -> l -> s (Eq. 12)
                composed = f(f(x_t, t, l, c, w, weights=o.mva_target), l, s, c, w, weights=o.mva_target)
                total = total + mva_loss(f(x_t, t, s, c, w), composed)[0]
        return total / B

    # -- declared cost ---------------------------------------------------------------------------------
    def cost(self, mva_share: float = 0.0) -> ForwardCost:
        """Expected passes per sample (conditional data assumed; `weak` includes pdg's weak passes with grad).

        FM kept:    1 full grad + 1 uncond (weak for pdg-sfm, full no-grad for sfm)
        FM dropped: 1 weak grad (pdg-sfm) or 1 full grad (sfm)
        SCM:        1 full grad + 1 uncond + 1 full no-grad F(x_t, t, t, c) (if velocity_mix < 1) + 1 full no-grad target
        MVA:        1 full grad + 2 full no-grad (the composed target)
        """
        a, b, m = self.shares(mva_share)
        q = self.drop_prob
        mixpass = b if self.options.velocity_mix < 1 else 0.0
        uncond = a * (1 - q) + b
        if self.pdg:
            return ForwardCost(
                full_grad=a * (1 - q) + b + m, full_nograd=mixpass + b + 2 * m, weak=a * q + uncond
            )
        return ForwardCost(full_grad=a + b + m, full_nograd=uncond + mixpass + b + 2 * m, weak=0.0)


@hookimpl
def register_objectives(register):
    register(
        "sfm",
        functools.partial(SolutionFlow, pdg=False),
        summary="solution flow (SoFlow): FM + SCM (+ --mva), CFG folded into the target via a full uncond pass",
        options=SFMOptions,
        default_sampler="solution",
    )
    register(
        "pdg-sfm",
        functools.partial(SolutionFlow, pdg=True),
        summary="EFlow: solution flow with path-drop guidance (weak-path uncond velocity) and optional MVA",
        options=PDGSFMOptions,
        default_sampler="solution",
    )


__all__ = [
    "Groups",
    "PDGSFMOptions",
    "SFMDraws",
    "SFMOptions",
    "SolutionFlow",
    "cfg_decay",
    "guided_velocity",
    "mva_loss",
    "plan_groups",
    "scm_loss",
    "self_guided_velocity",
    "straight_path",
]
