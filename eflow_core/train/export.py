"""`eflow export`: a run's checkpoint consolidated into the full layout, one file per kind of state.

A sharded checkpoint (FSDP under torchrun, dcp/ holding every rank's shards) is read whole in this
process, without a process group, and written as config.json, model.safetensors, ema.safetensors,
trainer_state.pt (the optimizer state in optimizer.state_dict()'s layout) and manifest.json: the files
of a full checkpoint, bit for bit the tensors the ranks held. The directory is also a run of the flat
layout, so `eflow sample DIR`, `eflow eval DIR` and `eflow train --resume --out DIR` take it as it is.
A full checkpoint exports to the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eflow.errors import EflowError
from eflow.run_dir import CHECKPOINTS, CONFIG, EXPORTS, checkpoint_dirs, step_dir_name, step_of
from eflow.train import checkpoint


@dataclass
class Exported:
    """What export_checkpoint wrote."""

    out: Path  # the new directory
    source: Path  # the checkpoint it came from
    step: int
    sharded: bool  # whether the source was sharded
    world_size: int | None  # the ranks that wrote a sharded source


def _source(run_dir: Path, step: int | None, warn: Callable[[str], None] | None) -> Path:
    if step is None:
        return checkpoint.usable_checkpoint(run_dir, warn)
    directory = run_dir / CHECKPOINTS / step_dir_name(step)
    if not directory.is_dir():
        steps = [step_of(p) for p in checkpoint_dirs(run_dir)]
        raise EflowError(f"{run_dir} has no checkpoint of step {step}; its checkpoints: {steps or 'none'}")
    problem = checkpoint.verify(directory)
    if problem is not None:
        raise EflowError(f"checkpoint {directory} is unusable ({problem})")
    return directory


def export_checkpoint(
    run_dir: str | Path,
    *,
    step: int | None = None,
    out: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Exported:
    """Write the checkpoint of `step` (default: the newest usable one) of the run in `run_dir` in the full
    layout into the new directory `out` (default: RUN/exports/step_N)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EflowError(f"run directory not found: {run_dir}")
    source = _source(run_dir, step, warn)
    state = checkpoint.read_trainer_state(source)
    world_size = state.pop("world_size", None)  # a full checkpoint's state has no world size
    model, _ = checkpoint.read_weights(source, "model")
    ema, _ = checkpoint.read_weights(source, "ema")
    saved_step = int(state["step"])
    target = Path(out) if out is not None else run_dir / EXPORTS / step_dir_name(saved_step)
    checkpoint.write_full_checkpoint(
        target, config_json=(source / CONFIG).read_text(), model=model, ema=ema, state=state
    )
    sharded = checkpoint.is_sharded(source)
    return Exported(target, source, saved_step, sharded, world_size if sharded else None)
