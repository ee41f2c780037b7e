"""The stages of Efficient-vDiT's pipeline, each an ordinary run directory (docs/distillation.md).

    tiles_stage      search each layer's tile mask on the teacher (no training); the run holds the
                     teacher's weights with the searched per-block masks
    attention_stage  attention distillation (`attn-distill`) of that sparse student against the teacher
    mlcd_stage       multi-step latent consistency distillation (`mlcd`) from the teacher
    run_pipeline     the three in order under one folder: OUT/1-tiles, OUT/2-attention, OUT/3-mlcd

A student starts from another run's weights (the teacher's, or the previous stage's EMA): init_run writes
the student's config and a step-0 checkpoint holding those weights, and the trainer then continues that
run as it resumes any run (so the trainer itself needs no hook). A stage whose run directory already
holds a checkpoint continues it with its saved config, or is skipped when it reached its steps; the tile
search is done once tiles.json is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from eflow.assembly import build_parts, resolve_device
from eflow.atomic import atomic_write_text
from eflow.config import SHAPE_FIELDS, RunConfig, build_config, load_run_config, parse_assignments
from eflow.distill.teacher import TEACHER_FLAGS, check_compatible, check_velocity_teacher, load_teacher
from eflow.distill.tiles import TileSearch, calibration_batches, search_tiles, tile_candidates
from eflow.errors import EflowError
from eflow.run_dir import CONFIG
from eflow.train import checkpoint

TILES_JSON = "tiles.json"  # the search's table, beside the tile stage's run
STAGE_DIRS = {"tiles": "1-tiles", "attention": "2-attention", "mlcd": "3-mlcd"}
LCM_EMA_DECAY = 0.95  # EMA rate of the consistency target network (LCM, Luo et al. 2023)
DENSE = {"drop_ratio": 0.0, "dense_every": 0, "mva_share": 0.0}  # distillation trains on all tokens
NO_SAMPLER = {"sampler": None, "sampler_options": {}}  # a student samples with its objective's own sampler


@dataclass
class StageResult:
    """What a stage did: "trained" (from its start), "continued", "skipped" (already done) or "searched"."""

    stage: str
    run_dir: Path
    status: str
    step: int = 0
    detail: str = ""


def student_config(
    base: RunConfig,
    out: str | Path,
    *,
    objective: str,
    options: dict[str, Any],
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """`base` (the teacher's or the previous stage's config) turned into a student run in `out`: another
    objective, dense tokens in every stage (their clip sizes kept), the given section fields replaced,
    then --set pairs; checked and written out in full like `eflow train`'s."""
    from eflow.run_config import check_run_config

    tree = base.model_dump(mode="json")
    tree["objective"] = {"name": objective, "options": dict(options)}
    tree["schedule"]["stages"] = [{**stage, **DENSE} for stage in base.schedule.view(SHAPE_FIELDS)]
    tree["train"].update(train or {})
    tree["train"]["out"] = str(out)
    tree["model"].update(model or {})
    tree["sample"].update(sample or {})
    cfg = build_config(
        tree,
        parse_assignments(sets),
        where="student config (the teacher's config.json with the distill flags)",
    )
    check_run_config(cfg)
    return cfg


def is_attention_weight(name: str) -> bool:
    """Whether a state-dict key belongs to a block's self-attention backend (may differ between backends)."""
    return ".attn." in name


def load_compatible(model: nn.Module, run_dir: Path, weights: str = "ema") -> list[str]:
    """Load another run's weights into `model` where they fit. Parameters only one attention backend has
    (a GLGA gate, a Sana kernel) may be missing on either side: the student keeps its own initialization
    of those; any other difference fails. Returns the student's keys left at their initialization."""
    tensors, _ = checkpoint.read_weights(checkpoint.usable_checkpoint(run_dir), weights)  # either layout
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    bad = [k for k in (*missing, *unexpected) if not is_attention_weight(k)] + wrong
    if bad:
        raise EflowError(
            f"the student cannot start from {run_dir}'s weights: {bad[:3]} differ (missing, extra or "
            "another shape); the student must have the teacher's preset and latent shape"
        )
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return missing


def init_run(run_dir: Path, cfg: RunConfig, init_from: Path, weights: str = "ema") -> list[str]:
    """Write `cfg` and a step-0 checkpoint (weights from run `init_from`, fresh optimizer) into `run_dir`,
    so that Trainer(cfg, resume=True) trains the student from those weights."""
    run_dir = Path(run_dir)
    model = build_parts(cfg, with_dataset=False).model
    kept = load_compatible(model, Path(init_from), weights)
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=t.betas)
    state = {"step": 0, "optimizer": optimizer.state_dict(), "ema_updates": 0, "skipped_files": {}}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, cfg.to_json())
    checkpoint.save_checkpoint(
        run_dir, config_json=cfg.to_json(), model=model, ema=model, state=state, keep=t.keep_checkpoints
    )
    return kept


def checkpoint_step(run_dir: Path) -> int:
    """The step of a run's newest checkpoint, -1 without one."""
    step = checkpoint.checkpoint_step(run_dir)
    return -1 if step is None else step


STAGE_SETTINGS = (  # what the distill flags set: a rerun that asks otherwise is told they were not applied
    ("objective", "options"),
    ("model", "attention"),
    ("model", "attention_options"),
    ("train", "steps"),
    ("train", "batch_size"),
    ("train", "lr"),
    ("train", "seed"),
)


def ignored_settings(saved: RunConfig, asked: RunConfig) -> str:
    """'; kept its saved settings, not this call's: FIELD SAVED (asked ASKED), ...' for the distill settings
    where a rerun asks other values than the run in its folder holds ('' when none differ)."""
    old, new = saved.model_dump(mode="json"), asked.model_dump(mode="json")
    changes = []
    for section, field in STAGE_SETTINGS:
        a, b = old[section][field], new[section][field]
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [
                f"{section}.{field}.{k} {a.get(k)!r} (asked {b.get(k)!r})"
                for k in sorted(a.keys() | b.keys())
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            changes.append(f"{section}.{field} {a!r} (asked {b!r})")
    if not changes:
        return ""
    return (
        f"; kept its saved settings, not this call's: {', '.join(changes)}. Another --out distills with "
        f"them; `eflow train --out {saved.train.out} --resume --steps N` trains this one further"
    )


def train_stage(
    stage: str, cfg: RunConfig, init_from: Path, *, console: Console | None = None, progress: bool = True
) -> StageResult:
    """Train the student of `cfg` from run `init_from`'s EMA weights, or continue / skip the run already
    in cfg.train.out (with its saved config)."""
    from eflow.train.trainer import Trainer

    run_dir = Path(cfg.train.out)
    if checkpoint.has_checkpoint(run_dir):
        saved = load_run_config(run_dir)
        if saved.objective.name != cfg.objective.name:
            raise EflowError(
                f"{run_dir} holds a run of objective {saved.objective.name!r}, not this stage's "
                f"{cfg.objective.name!r}; choose another --out"
            )
        step = checkpoint_step(run_dir)
        kept = ignored_settings(saved, cfg)
        if step >= saved.train.steps:
            return StageResult(stage, run_dir, "skipped", step, f"finished at step {step}" + kept)
        result = Trainer(saved, resume=True, console=console, progress=progress).run()
        return StageResult(stage, run_dir, "continued", result.step, f"from step {step}" + kept)
    kept = init_run(run_dir, cfg, init_from)
    result = Trainer(cfg, resume=True, console=console, progress=progress).run()
    detail = f"from {init_from}" + (f"; {len(kept)} attention weights newly initialized" if kept else "")
    return StageResult(stage, run_dir, "trained", result.step, detail)


def student_stage(
    stage: str,
    teacher_dir: Path,
    teacher_cfg: RunConfig,
    init_dir: str | Path,
    out: str | Path,
    *,
    console: Console | None = None,
    progress: bool = True,
    **fields: Any,
) -> StageResult:
    """Train (or continue / skip) `stage`'s student: run `init_dir` turned into a student in `out` by
    student_config(..., **fields), checked against the teacher's config, started from `init_dir`'s weights."""
    init_dir = Path(init_dir)
    cfg = student_config(load_run_config(init_dir), out, **fields)
    check_compatible(teacher_cfg, cfg, f"teacher {teacher_dir}")
    return train_stage(stage, cfg, init_dir, console=console, progress=progress)


def tiles_stage(
    teacher_dir: str | Path,
    out: str | Path,
    *,
    budget: float = 0.5,
    threshold: float | None = None,
    clips: int = 8,
    batch_size: int = 2,
    max_reference: int = 2,
    max_window: int = 1,
    device: str = "auto",
    seed: int = 0,
    sets: list[str] | None = None,
) -> tuple[StageResult, TileSearch | None]:
    """Search every layer's tile mask on the teacher; write the student run (the teacher's weights, tile
    attention with per-block masks) and tiles.json into `out`. Skipped when tiles.json is there."""
    teacher_dir, out = Path(teacher_dir), Path(out)
    if (out / TILES_JSON).is_file() and checkpoint.has_checkpoint(out):
        return StageResult("tiles", out, "skipped", 0, f"{out / TILES_JSON} exists"), None
    if not 0 < budget <= 1:
        raise EflowError(f"--budget {budget}: give a fraction of dense attention FLOPs in (0, 1]")
    dev = resolve_device(device)
    teacher = load_teacher(teacher_dir, dev, keep_parts=True)
    frames = teacher.model.token_grid((1, *teacher.parts.latent_shape))[0]
    batches = calibration_batches(
        teacher.cfg,
        teacher.parts.autoencoder,
        teacher.parts.conditioner,
        clips=clips,
        batch_size=batch_size,
        seed=seed,
        device=dev,
    )
    search = search_tiles(
        teacher.model,
        batches,
        tile_candidates(frames, max_reference, max_window),
        budget=budget,
        threshold=threshold,
    )
    cfg = student_config(
        teacher.cfg,
        out,
        objective=teacher.cfg.objective.name,
        options=teacher.cfg.objective.options,
        model={"attention": search.backend, "attention_options": search.attention_options()},
        sample=NO_SAMPLER,
        sets=sets,
    )
    check_compatible(teacher.cfg, cfg, f"teacher {teacher_dir}")
    del teacher, batches
    init_run(out, cfg, teacher_dir)
    atomic_write_text(out / TILES_JSON, json.dumps(search.to_json(), indent=1) + "\n")
    over = sum(c.over_budget for c in search.choices)
    detail = f"mean attention cost {search.mean_cost():.3f} of dense" + (
        f"; {over} blocks over budget (no candidate fit)" if over else ""
    )
    return StageResult("tiles", out, "searched", 0, detail), search


def attention_stage(
    teacher_dir: str | Path,
    init_dir: str | Path,
    out: str | Path,
    *,
    steps: int = 500,
    options: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> StageResult:
    """Attention distillation: the run in `init_dir` (sparse attention) learns to match every layer's
    attention output (and the final output) of the teacher."""
    teacher_dir = Path(teacher_dir)
    return student_stage(
        "attention",
        teacher_dir,
        load_run_config(teacher_dir, train_flags=TEACHER_FLAGS),
        init_dir,
        out,
        console=console,
        progress=progress,
        objective="attn-distill",
        options={**(options or {}), "teacher": str(teacher_dir.resolve())},
        train={"steps": steps, **(train or {})},
        sample=NO_SAMPLER,
        sets=sets,
    )


def mlcd_stage(
    teacher_dir: str | Path,
    init_dir: str | Path,
    out: str | Path,
    *,
    segments: int = 4,
    steps: int = 1000,
    guidance: float = 4.0,
    shift: float = 3.0,
    options: dict[str, Any] | None = None,
    attention: str | None = None,
    train: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> StageResult:
    """Multi-step latent consistency distillation of the run in `init_dir` (the teacher itself for plain
    `eflow distill`) from the teacher's Euler + CFG trajectory split into `segments` segments. The
    student samples with `segment` (one jump per segment) at `guidance`, the CFG scale it learned."""
    teacher_dir = Path(teacher_dir)
    teacher_cfg = load_run_config(teacher_dir, train_flags=TEACHER_FLAGS)
    check_velocity_teacher(teacher_cfg, f"teacher {teacher_dir}")
    opts = {"w_min": guidance, "w_max": guidance, **(options or {})}
    opts.update(teacher=str(teacher_dir.resolve()), segments=segments, shift=shift)
    return student_stage(
        "mlcd",
        teacher_dir,
        teacher_cfg,
        init_dir,
        out,
        console=console,
        progress=progress,
        objective="mlcd",
        options=opts,
        train={"steps": steps, "ema_decay": LCM_EMA_DECAY, **(train or {})},
        model={"attention": attention, "attention_options": {}} if attention else None,
        sample={**NO_SAMPLER, "sampler_options": {"shift": shift}, "steps": segments, "guidance": guidance},
        sets=sets,
    )


def run_pipeline(
    teacher_dir: str | Path,
    out: str | Path,
    *,
    tiles: dict[str, Any] | None = None,
    attention: dict[str, Any] | None = None,
    mlcd: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_stage=None,
) -> list[StageResult]:
    """tiles -> attention distillation -> MLCD under `out` (STAGE_DIRS), each stage resumable; keyword
    dicts go to tiles_stage, attention_stage and mlcd_stage. on_stage(result) after each stage."""
    out = Path(out)
    dirs = {name: out / sub for name, sub in STAGE_DIRS.items()}
    device = (train or {}).get("device", "auto")
    results = [tiles_stage(teacher_dir, dirs["tiles"], device=device, sets=sets, **(tiles or {}))[0]]
    common = {"train": train, "sets": sets, "console": console, "progress": progress}
    for make in (
        lambda: attention_stage(teacher_dir, dirs["tiles"], dirs["attention"], **common, **(attention or {})),
        lambda: mlcd_stage(teacher_dir, dirs["attention"], dirs["mlcd"], **common, **(mlcd or {})),
    ):
        if on_stage is not None:
            on_stage(results[-1])
        results.append(make())
    if on_stage is not None:
        on_stage(results[-1])
    return results
