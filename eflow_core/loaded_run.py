"""A trained run ready to sample from, as `eflow sample` and `eflow eval` load it.

config.json -> build_parts (no dataset) -> EMA or online weights -> the model, autoencoder and text
encoder on the device; plus the precision the run samples at (bf16 autocast on CUDA, fp32 on CPU,
unless the run fixed one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eflow.assembly import Parts, build_parts
from eflow.config import RunConfig, load_run_config
from eflow.errors import ConfigError, EflowError
from eflow.train.checkpoint import load_weights


@dataclass
class LoadedRun:
    """A run ready to sample from."""

    run_dir: Path
    cfg: RunConfig
    parts: Parts  # model on `device`, eval mode
    step: int  # the optimizer step of the loaded weights
    weights: str  # "ema" or "model"
    device: torch.device
    precision: str  # "bf16" or "fp32"


def load_run(run_dir: str | Path, device: torch.device, weights: str = "ema") -> LoadedRun:
    """Rebuild the run in `run_dir` from config.json and load its weights onto `device`."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EflowError(f"{run_dir} is a file; give the run directory `eflow train --out` wrote")
    if not run_dir.is_dir():
        raise EflowError(f"run directory not found: {run_dir}")
    if weights not in ("ema", "model"):
        raise ConfigError(f"--weights {weights!r}: choose ema or model")
    cfg = load_run_config(run_dir)
    parts = build_parts(cfg, with_dataset=False)
    step = load_weights(parts.model, run_dir, weights)
    parts.model.to(device).eval()
    parts.move_to(device)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return LoadedRun(run_dir, cfg, parts, step, weights, device, precision)
