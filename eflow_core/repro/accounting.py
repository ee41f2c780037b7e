"""What a row cost: model FLOPs (counted while training, predicted before it), step time, clips and tokens.

Counted FLOPs: `CountingTrainer` is eflow's Trainer with a forward pre-hook on the online and EMA models
that adds, for every network call of a training step, samples x the analytic forward FLOPs of that call
(eflow.bench.model_flops.forward_flops on the call's path and kept tokens) x 3 when the call builds a
graph (forward + backward), and writes the step's sum to metrics.jsonl as `model_flops`. Sampling for
previews is not counted. metrics.jsonl is cut back to the checkpoint when a run resumes, so the sum over
its lines is the FLOPs of exactly the steps the weights have seen, across sittings. A backend whose FLOPs
the counter does not know (Sana's convolutional Mix-FFN) gives no `model_flops`.

Predicted FLOPs (for `--match compute`, before anything trains): per stage of schedule.stages,
the objective's declared passes per sample (Objective.cost at the stage's MVA share) times the forward
FLOPs of the full path on the stage's kept tokens (one dense step in `dense_every` counted dense) and of
the weak path; full passes with gradient x 3, the rest x 1 (the declared cost does not say which weak
passes carry a gradient: pdg-sfm's weak-path FM samples, 0.15 of a pass per sample, are counted x 1).
Stage shares weight the sum; times the batch size. The stages' clip sizes (the curriculum in
schedule.stages) are not modelled: every stage is costed at the data section's size.

Step time: metrics.jsonl's `it_s` is 1 / the seconds since the previous step (the first step of a sitting
includes start-up), so the sum of 1 / it_s over its lines is the training time of the steps kept.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eflow.atomic import atomic_write_text
from eflow.bench.ladder import check_parts, condition_tokens, preset_field, random_condition, token_grid
from eflow.bench.model_flops import BACKWARD_FACTOR, forward_flops
from eflow.config import RunConfig, load_run_config
from eflow.registry import get_registry
from eflow.run_dir import CONFIG, METRICS
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer

SESSIONS = "repro_sessions.json"  # per run directory: the sittings that trained it (device, concurrency)


class FlopCounter:
    """Sums analytic model FLOPs of the forward calls made while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.flops = 0.0
        self.unknown = False  # a call whose FLOPs the analytic counter cannot give
        self._cache: dict[tuple, float | None] = {}

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def reset(self) -> None:
        self.flops, self.unknown = 0.0, False

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        x = args[0]
        path, keep = kwargs.get("path", "full"), kwargs.get("keep")
        cond = args[3] if len(args) > 3 else kwargs.get("cond")
        text = condition_tokens(cond) if cond is not None else 0
        grid = module.token_grid(x.shape)
        kept = keep.shape[1] if keep is not None else math.prod(grid)
        key = (path, grid, kept, text)
        if key not in self._cache:  # GLGA's window pairs differ a little between kept sets: the first is used
            first = keep[:1].cpu() if keep is not None else None
            self._cache[key] = forward_flops(module, grid, first, path, text).total
        per_sample = self._cache[key]
        if per_sample is None:
            self.unknown = True
            return
        self.flops += x.shape[0] * per_sample * (BACKWARD_FACTOR if torch.is_grad_enabled() else 1.0)


class CountingTrainer(Trainer):
    """eflow's Trainer, writing each step's counted model FLOPs to metrics.jsonl (`model_flops`)."""

    def train_step(self, step: int) -> dict[str, float]:
        counter = getattr(self, "_flop_counter", None)
        if counter is None:
            counter = self._flop_counter = FlopCounter()
            counter.attach(self.model)
            counter.attach(self.ema.model)
        counter.reset()
        counter.active = True
        try:
            record = super().train_step(step)
        finally:
            counter.active = False
        if not counter.unknown:
            record["model_flops"] = counter.flops
        return record


def meta_parts(cfg: RunConfig, run_dir: Path | None = None):
    """The config's parts on the meta device (shapes only, no memory). A label-conditioned config gets its
    class count from the run's saved config when there is one, else from the preset (as the bench does):
    the class embedding's size changes the parameter count, not the FLOPs."""
    if cfg.data.condition == "label" and cfg.data.num_classes is None:
        classes = None
        if run_dir is not None and (Path(run_dir) / CONFIG).is_file():
            classes = load_run_config(run_dir).data.num_classes
        classes = classes or preset_field(cfg, "num_classes") or 1
        cfg = cfg.model_copy(deep=True)
        cfg.data.num_classes = classes
    return check_parts(cfg)


def predicted_step_flops(cfg: RunConfig) -> float | None:
    """Model FLOPs of one optimizer step averaged over the schedule (module docstring); None if unknown."""
    parts = meta_parts(cfg)
    model, grid = parts.model, token_grid(parts)
    text = condition_tokens(random_condition(parts, 1, torch.Generator().manual_seed(0)))
    objective = get_registry("objective").create(
        cfg.objective.name, options=cfg.objective.options, total_steps=cfg.train.steps
    )
    drop = get_registry("token_drop").create(cfg.token_drop.name, options=cfg.token_drop.options)
    dense = forward_flops(model, grid, None, "full", text).total
    weak = forward_flops(model, grid, None, "weak", text).total
    if dense is None or weak is None:
        return None
    total = 0.0
    for stage in cfg.schedule.stages:
        ratio = drop.effective_ratio(stage.drop_ratio)
        full = dense
        if ratio > 0:
            keep = drop.select(grid, 1, ratio, torch.Generator().manual_seed(cfg.train.seed))
            dropped = forward_flops(model, grid, keep, "full", text).total
            dense_share = 1.0 / stage.dense_every if stage.dense_every else 0.0
            full = dense_share * dense + (1.0 - dense_share) * dropped
        cost = objective.cost(objective.effective_mva_share(stage.mva_share))
        per_sample = BACKWARD_FACTOR * cost.full_grad * full + cost.full_nograd * full + cost.weak * weak
        total += (stage.end - stage.start) * per_sample
    return total * cfg.train.batch_size


def model_facts(cfg: RunConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Parameters and tokens per clip of a config's model (built on the meta device, see meta_parts)."""
    parts = meta_parts(cfg, run_dir)
    grid = token_grid(parts)
    return {
        "params": sum(p.numel() for p in parts.model.parameters()),
        "token_grid": "x".join(map(str, grid)),
        "tokens_per_clip": math.prod(grid),
    }


def read_metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (a torn line skipped)."""
    path = Path(run_dir) / METRICS
    return read_metrics(path) if path.is_file() else []


def training_totals(run_dir: Path, steps: int) -> dict[str, Any]:
    """Training seconds, model FLOPs and the mean middle-stack keep share from metrics.jsonl.

    Totals over logged steps; when fewer steps were logged than trained (train.log_every > 1), they are
    scaled up by steps / logged and marked `extrapolated`."""
    lines = [r for r in read_metrics_lines(run_dir) if isinstance(r.get("step"), int) and r["step"] < steps]
    if not lines:
        return {"logged_steps": 0, "train_seconds": None, "model_flops": None, "middle_keep": None}
    scale = steps / len(lines)
    seconds = sum(1.0 / r["it_s"] for r in lines if r.get("it_s")) * scale
    counted = [r["model_flops"] for r in lines if isinstance(r.get("model_flops"), (int, float))]
    flops = sum(counted) * steps / len(counted) if counted else None
    keep = sum(1.0 - float(r.get("drop_ratio", 0.0)) for r in lines) / len(lines)
    out = {
        "logged_steps": len(lines),
        "train_seconds": seconds,
        "model_flops": flops,
        "middle_keep": keep,
    }
    if len(lines) < steps or (counted and len(counted) < len(lines)):
        out["extrapolated"] = f"from {len(lines)} logged steps ({len(counted)} with model_flops) of {steps}"
    return out


def record_session(run_dir: Path, start: int, end: int, device: str, concurrent: int, seconds: float) -> None:
    """Append one training sitting to RUN/repro_sessions.json."""
    path = Path(run_dir) / SESSIONS
    sessions = read_sessions(run_dir)
    sessions.append(
        {
            "from_step": start,
            "to_step": end,
            "device": device,
            "concurrent_rows": concurrent,
            "wall_s": round(seconds, 3),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(path, json.dumps(sessions, indent=1) + "\n")


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / SESSIONS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []
