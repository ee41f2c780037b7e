"""The run directory's layout: where a run's config, checkpoints, metrics and samples live.

    RUN/
      config.json             the run's resolved config (written atomically when a run starts)
      metrics.jsonl           one JSON line per logged step
      samples/                preview grids and `eflow sample` outputs
      checkpoints/
        step_00000250/        a committed checkpoint: config.json, model.safetensors, ema.safetensors,
                              trainer_state.pt and manifest.json (step, size and SHA-256 of every file)
        step_00000500/        a sharded checkpoint (FSDP under torchrun): config.json, trainer_state.pt,
                              dcp/ (torch.distributed.checkpoint: every rank's shards of weights and
                              optimizer state, the EMA once) and manifest.json ("sharded", "world_size")
        .tmp-step_00000500-*  a save in progress, or the leftover of a crashed one (removed at next start)
      .lock                   held by the training process (its pid and host)

A checkpoint is committed by renaming its finished temp directory to `step_N`, one atomic rename, so a
`step_N` directory is always complete; the newest one is the run's checkpoint and the older ones stay
until `train.keep_checkpoints` newer ones exist. Runs written before 2026-11-30 keep one checkpoint's
files at the top of RUN (the flat layout); they still load.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
SHARDS = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder
EXPORTS = "exports"  # `eflow export`'s default place: RUN/exports/step_N
METRICS = "metrics.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """The name of the checkpoint directory of a step: step_00000250."""
    return f"step_{step:08d}"


def step_of(directory: str | Path) -> int | None:
    """The step a committed checkpoint directory is named for (step_00000250 -> 250); None for another name."""
    match = _STEP_DIR.match(Path(directory).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The committed checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory holding the run's newest checkpoint (RUN itself for the flat layout), or None."""
    run_dir = Path(run_dir)
    dirs = checkpoint_dirs(run_dir)
    if dirs:
        return dirs[-1]
    return run_dir if (run_dir / STATE).is_file() else None


def config_path(run_dir: str | Path) -> Path:
    """The config a run is rebuilt from: its newest checkpoint's, else the one written at its start."""
    latest = latest_checkpoint(run_dir)
    if latest is not None and (latest / CONFIG).is_file():
        return latest / CONFIG
    return Path(run_dir) / CONFIG
