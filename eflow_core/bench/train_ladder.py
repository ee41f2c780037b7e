"""`eflow bench train`: the training-throughput ladder of EFlow Fig. 4a, one rung per step of the recipe.

Rungs (each adds one of the paper's steps to the one before; `TRAIN_RUNGS`):

    fm-softmax   flow matching, full softmax attention, no dropping: the Wan-style baseline
    sfm          solution flow (objective `sfm`: FM + SCM, CFG folded into the target through a full
                 no-grad unconditional pass), no MVA
    sfm-mva      + the MVA regularizer (option mva = true, a share MVA_SHARE of the batch)
    +glga        + GLGA attention (one softmax block every K, the preset's softmax_ratio)
    +pdg         + path-drop guidance (objective `pdg-sfm`: the unconditional velocity from the weak path)
    +drop        + token dropping in the middle stack, ratio 0.75 (the recipe's drop stage, C.1), with the
                 base config's strategy (sprint); MVA stays on so that the rung changes one thing

Every rung trains the same preset on the same clip, batch and random inputs (latents ~ N(0, I) of the
autoencoder's latent shape; random class labels, or random text embeddings of the configured text
encoder's width), starting from the same seeded weights. One step is what `eflow train` does per
step: the objective's loss under bf16 autocast (fp32 weights), backward, gradient clipping, AdamW and the
EMA update (`train_step`); only the data loading is left out.

The base config's [parallel] section applies as in `eflow train` on one process: activation
checkpointing (`ac`) on the online model and per-block torch.compile (`compile`) on the online model
and the EMA, from outside the model (eflow.parallel.parallelize); fsdp and sp need torchrun and are
refused here.

Measured per rung: `warmup` untimed steps (compilation happens there; their total and the first step
are reported as warmup_s and first_step_s), then `steps` timed steps (eflow.bench.timing): median
ms/step, it/s = 1000 / median, samples/s = batch x it/s, and on CUDA the peak memory allocated during
the timed steps (weights, optimizer state and EMA included).

Forward passes and FLOPs: a forward pre-hook on the online and EMA models records every call the
objective makes (path, gradient on or off, samples), so `passes` is what really ran, per sample and
step: full_grad, full_nograd, weak_grad, weak_nograd. FLOPs per step = sum over the timed calls of
samples x forward FLOPs of that path (eflow.bench.model_flops: analytic matmul FLOPs; a full pass
uses the middle stack's kept tokens) x 3 for calls with gradient (forward + backward), / steps.
TF/s = FLOPs per step / median time; MFU = TF/s / the device's dense bf16 peak (eflow.bench.device_peak).

An out-of-memory error (or any other exception) in a rung becomes that rung's status ("oom",
"error: ...") and the ladder goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from eflow.assembly import Parts, build_parts
from eflow.bench import ladder
from eflow.bench.model_flops import BACKWARD_FACTOR, forward_flops
from eflow.bench.timing import time_calls
from eflow.condition import Condition
from eflow.config import RunConfig
from eflow.errors import ConfigError
from eflow.network import DropPlan, Network
from eflow.objective import StepInfo, to_floats
from eflow.parallel.parallelize import parallelize
from eflow.registry import get_registry
from eflow.train.distributed import World
from eflow.train.ema import EMA

MVA_SHARE = 0.25  # the recipe's MVA stage share (eflow_stages: the last 20% of the run)
DROP_RATIO = 0.75  # the recipe's drop stage (EFlow C.1)
PASS_KINDS = ("full_grad", "full_nograd", "weak_grad", "weak_nograd")


@dataclass(frozen=True)
class TrainRung:
    """One rung of the training ladder: what changes; everything else comes from the base config."""

    name: str
    attention: str = "softmax"  # model.attention
    objective: str = "fm"  # objective.name
    mva: bool = False  # objective.options.mva (the sfm family)
    mva_share: float = MVA_SHARE  # share of the batch trained with MVA when mva is on
    drop: float = 0.0  # token-drop ratio of the middle stack
    token_drop: str | None = None  # token-drop strategy; None: the base config's (sprint)


TRAIN_RUNGS: dict[str, TrainRung] = {
    rung.name: rung
    for rung in (
        TrainRung("fm-softmax", attention="softmax", objective="fm"),
        TrainRung("sfm", attention="softmax", objective="sfm"),
        TrainRung("sfm-mva", attention="softmax", objective="sfm", mva=True),
        TrainRung("+glga", attention="glga", objective="sfm", mva=True),
        TrainRung("+pdg", attention="glga", objective="pdg-sfm", mva=True),
        TrainRung("+drop", attention="glga", objective="pdg-sfm", mva=True, drop=DROP_RATIO),
    )
}
RUNG_KEYS = {  # --rung KEY=VALUE key -> TrainRung field
    "attn": "attention",
    "objective": "objective",
    "mva": "mva",
    "mva_share": "mva_share",
    "drop": "drop",
    "token_drop": "token_drop",
}
DEFAULT_RUNG = TrainRung("custom")  # what a custom rung without base= starts from


def train_rungs(values: list[str] | None) -> list[TrainRung]:
    """--rung values -> rungs: names of TRAIN_RUNGS (comma-separated), or one custom rung as KEY=VALUE pairs."""
    return ladder.parse_rungs(values, TRAIN_RUNGS, RUNG_KEYS, DEFAULT_RUNG)


def train_rung_config(base: RunConfig, rung: TrainRung) -> RunConfig:
    """The base config with the rung's attention, objective (+ mva) and a single schedule stage.

    A plugin that differs from the base config's starts from its default options (the base's would not
    fit); the same plugin keeps the base's options (e.g. the recipe's fm_ratio, r0, sprint group).
    """
    tree = base.model_dump(mode="json")
    ladder.set_plugin(tree["model"], "attention", "attention_options", rung.attention)
    objective = tree["objective"]
    ladder.set_plugin(objective, "name", "options", rung.objective)
    entry = get_registry("objective").get(rung.objective)
    if entry.options is not None and "mva" in entry.options.model_fields:
        objective["options"]["mva"] = rung.mva
    elif rung.mva:
        raise ConfigError(f"rung '{rung.name}': objective '{rung.objective}' has no MVA term (mva=true)")
    drop = tree["token_drop"]
    ladder.set_plugin(drop, "name", "options", rung.token_drop or drop["name"])
    share = rung.mva_share if rung.mva else 0.0
    tree["schedule"]["stages"] = [{"start": 0.0, "end": 1.0, "drop_ratio": rung.drop, "mva_share": share}]
    return ladder.rung_config(base, rung.name, tree)


@dataclass
class TrainLadderSpec(ladder.LadderSpec):
    """What to run: rungs on top of one base config, and how to time them (the batch: the base config's)."""

    base: RunConfig
    rungs: list[TrainRung]
    steps: int = 10  # timed steps per rung
    warmup: int = 3  # untimed steps first (compilation happens here)
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32
    seed: int = 0

    def config_of(self, rung: TrainRung) -> RunConfig:
        return train_rung_config(self.base, rung)

    def validate(self) -> list[RunConfig]:
        p = self.base.parallel
        if p.fsdp or p.sp > 1:
            raise ConfigError(
                "eflow bench train runs one process: parallel.fsdp and parallel.sp apply under torchrun "
                "(eflow train); --ac and --compile apply here. For a config that sets them, add "
                "--set parallel.fsdp=false --set parallel.sp=1"
            )
        return super().validate()

    def limits(self) -> list[tuple[str, int, int]]:
        return [("--steps", self.steps, 1), ("--warmup", self.warmup, 0)]

    def timing_parameters(self) -> dict[str, Any]:
        p = self.base.parallel
        return {
            "batch": self.base.train.batch_size,
            "steps": self.steps,
            "warmup": self.warmup,
            "ac": p.ac,
            "compile": p.compile,
        }


@dataclass
class TrainRecord:
    """The result of one rung (one row of results.csv)."""

    rung: str
    attention: str
    objective: str
    mva_share: float  # share of the batch trained with MVA (0: off)
    drop: float  # token-drop ratio actually applied
    token_drop: str
    preset: str
    grid: str  # "T'xH'xW'"
    tokens: int  # N per sample
    kept: int  # tokens the middle stack sees per sample on the full path
    batch: int
    dtype: str
    device: str
    params: int | None = None
    ac: str = "off"  # parallel.ac: activation checkpointing
    compiled: bool = False  # parallel.compile: per-block torch.compile
    status: str = "ok"  # "ok", "oom" or "error: ..."
    it_s: float | None = None  # optimizer steps per second (1000 / median_ms)
    samples_s: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    warmup_s: float | None = None  # all warm-up steps (compilation included)
    first_step_s: float | None = None
    flops: float | None = None  # model FLOPs per step (forward x1, forward + backward x3)
    tflops: float | None = None  # flops / median step time
    mfu: float | None = None  # tflops / the device's dense bf16 peak
    passes: dict[str, float] = field(default_factory=dict)  # forward passes per sample and step, by kind
    peak_gb: float | None = None  # CUDA peak allocated during the timed steps
    speedup: float | None = None  # it/s over the first rung's


@dataclass
class TrainState:
    """Everything one optimizer step of a rung touches."""

    rung: TrainRung
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    objective: Any
    token_drop: Any
    drop: float
    mva_share: float
    x0: Tensor  # [B, c, t, h, w] random latents
    cond: Condition
    dtype: torch.dtype  # autocast dtype
    grad_clip: float
    total_steps: int
    seed: int
    step: int = 0
    calls: list[tuple[str, bool, int]] = field(default_factory=list)  # (path, grad, samples) per forward


def train_step(state: TrainState) -> None:
    """One optimizer step as Trainer.train_step takes it (loss under autocast, backward, clip, AdamW, EMA)."""
    drop = None
    if state.drop > 0:
        drop = DropPlan(state.token_drop, state.drop, seed=state.seed + state.step, local_batch=len(state.x0))
    net = Network(state.model, state.ema.model, drop)
    info = StepInfo(step=state.step, total_steps=state.total_steps, mva_share=state.mva_share)
    device = state.x0.device
    autocast = (
        torch.autocast(device_type=device.type, dtype=state.dtype)
        if state.dtype != torch.float32
        else nullcontext()
    )
    with autocast:
        out = state.objective.loss(net, {"x0": state.x0, "cond": state.cond}, info)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    clip = state.grad_clip if state.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    to_floats({**out.metrics, "loss": out.loss, "grad_norm": grad_norm})  # the trainer's one host copy
    state.optimizer.step()
    state.ema.update(state.model)
    state.step += 1


def record_calls(model: nn.Module, calls: list[tuple[str, bool, int]]) -> None:
    """Append (path, grad enabled, samples) to `calls` on every forward of `model`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((kwargs.get("path", "full"), torch.is_grad_enabled(), args[0].shape[0]))

    model.register_forward_pre_hook(hook, with_kwargs=True)


def prepare(
    cfg: RunConfig, rung: TrainRung, spec: TrainLadderSpec, device: torch.device
) -> tuple[TrainState, Parts]:
    """The rung's model (seeded), EMA, optimizer, objective and random inputs, on `device`."""
    torch.manual_seed(spec.seed)
    parts = build_parts(cfg, with_dataset=False)
    model = parts.model.to(device)
    ema = EMA(model, cfg.train.ema_decay)
    state_calls: list[tuple[str, bool, int]] = []
    for module in (model, ema.model):
        record_calls(module, state_calls)
    alone = World()  # one process: what eflow train applies there (the hooks above stay on the wrappers)
    parallelize(model, cfg.parallel, alone, device)
    parallelize(ema.model, cfg.parallel.model_copy(update={"ac": "off"}), alone, device)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=t.betas)
    objective = get_registry("objective").create(
        cfg.objective.name, options=cfg.objective.options, total_steps=t.steps
    )
    token_drop = get_registry("token_drop").create(cfg.token_drop.name, options=cfg.token_drop.options)
    stage = cfg.schedule.stages[0]
    generator = torch.Generator().manual_seed(spec.seed)
    x0 = torch.randn((t.batch_size, *parts.latent_shape), generator=generator).to(device)
    cond = ladder.random_condition(parts, t.batch_size, generator).to(device)
    state = TrainState(
        rung=rung,
        model=model,
        ema=ema,
        optimizer=optimizer,
        objective=objective,
        token_drop=token_drop,
        drop=token_drop.effective_ratio(stage.drop_ratio),
        mva_share=stage.mva_share,
        x0=x0,
        cond=cond,
        dtype=spec.torch_dtype(device),
        grad_clip=t.grad_clip,
        total_steps=t.steps,
        seed=spec.seed,
        calls=state_calls,
    )
    return state, parts


def step_flops(state: TrainState, parts: Parts, steps: int) -> tuple[float | None, dict[str, float], int]:
    """(model FLOPs per step, passes per sample and step by kind, kept tokens) of the recorded calls."""
    grid = ladder.token_grid(parts)
    keep = None
    if state.drop > 0:
        keep = state.token_drop.select(grid, 1, state.drop, torch.Generator().manual_seed(state.seed))
    text = ladder.condition_tokens(state.cond)
    per_path = {path: forward_flops(state.model, grid, keep, path, text).total for path in ("full", "weak")}
    batch = state.x0.shape[0]
    passes = dict.fromkeys(PASS_KINDS, 0.0)
    for path, grad, samples in state.calls:
        passes[f"{path}_{'grad' if grad else 'nograd'}"] += samples / (steps * batch)
    total = None
    if all(per_path[path] is not None for path, _, _ in state.calls):
        total = sum(
            samples * per_path[path] * (BACKWARD_FACTOR if grad else 1.0)
            for path, grad, samples in state.calls
        )
    kept = keep.shape[1] if keep is not None else grid[0] * grid[1] * grid[2]
    return (None if total is None else total / steps), passes, kept


def measure(
    state: TrainState,
    parts: Parts,
    spec: TrainLadderSpec,
    device: torch.device,
    record: TrainRecord,
    peak: float | None,
) -> None:
    """Warm up, time `spec.steps` steps and fill `record` (speed, FLOPs, passes, memory)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for i in range(spec.warmup):
        sync()
        t0 = time.perf_counter()
        train_step(state)
        sync()
        if i == 0:
            record.first_step_s = time.perf_counter() - t0
    record.warmup_s = time.perf_counter() - started if spec.warmup else None
    state.calls.clear()  # count the timed steps only
    timing = time_calls(lambda: train_step(state), device, warmup=0, repeats=spec.steps)
    record.median_ms, record.min_ms, record.max_ms = timing.median_ms, timing.min_ms, timing.max_ms
    record.it_s = 1e3 / timing.median_ms if timing.median_ms > 0 else None
    record.samples_s = record.it_s * record.batch if record.it_s else None
    record.flops, record.passes, record.kept = step_flops(state, parts, spec.steps)
    ladder.fill_throughput(record, timing.median_ms * 1e-3, timing, peak)


def run_train_ladder(
    spec: TrainLadderSpec, on_start: Callable[[TrainRung], None] | None = None
) -> Iterator[TrainRecord]:
    """Yield one TrainRecord per rung, in order; failures become statuses and the ladder goes on."""
    configs = spec.validate()
    device, dtype, peak = spec.hardware()

    def new_record(rung: TrainRung, cfg: RunConfig, meta: Parts) -> TrainRecord:
        fields = ladder.rung_fields(rung, cfg, meta, cfg.train.batch_size, dtype, device)
        stage = cfg.schedule.stages[0]
        return TrainRecord(
            **fields,
            objective=cfg.objective.name,
            mva_share=stage.mva_share if cfg.objective.options.get("mva") else 0.0,  # refined below
            drop=stage.drop_ratio,
            token_drop=cfg.token_drop.name,
            kept=fields["tokens"],
            ac=cfg.parallel.ac,
            compiled=cfg.parallel.compile,
        )

    def measure_rung(rung: TrainRung, cfg: RunConfig, record: TrainRecord) -> None:
        state, parts = prepare(cfg, rung, spec, device)
        record.drop = state.drop
        record.mva_share = state.objective.effective_mva_share(state.mva_share)
        measure(state, parts, spec, device, record, peak)

    def finish(record: TrainRecord, first: TrainRecord) -> None:
        record.speedup = ladder.speedup(record.it_s, first.it_s)

    yield from ladder.run_rungs(spec, configs, device, new_record, measure_rung, finish, on_start)
