"""Run-directory checkpoints: config.json, model/ema safetensors, trainer_state.pt; every write atomic."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from eflow.atomic import atomic_path
from eflow.errors import EflowError

CONFIG = "config.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "trainer_state.pt"


def _save_weights(module: nn.Module, path: Path, step: int) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})


def save_checkpoint(
    run_dir: Path, *, config_json: str, model: nn.Module, ema: nn.Module, state: dict
) -> None:
    """Write the run's checkpoint; each file goes to a temp name first and is renamed into place."""
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    with atomic_path(run_dir / CONFIG) as tmp:
        Path(tmp).write_text(config_json)
    _save_weights(model, run_dir / MODEL, step)
    _save_weights(ema, run_dir / EMA, step)
    with atomic_path(run_dir / STATE) as tmp:
        torch.save(state, tmp)


def remove_run(run_dir: Path) -> None:
    """Delete a run's own files (checkpoint, metrics, samples), nothing else in the directory."""
    import shutil

    for name in (CONFIG, MODEL, EMA, STATE, "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "samples", ignore_errors=True)


def _load_weights(module: nn.Module, path: Path) -> int:
    if not path.is_file():
        raise EflowError(f"{path.parent} has no {path.name}: not a complete run directory")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # the step lives in the header metadata
            step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError) as err:
        raise EflowError(f"{path} is corrupt ({err}); restore it or retrain") from None
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise EflowError(
            f"{path} does not fit the model of config.json (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}); was the config edited after training?"
        )
    return step


def load_weights(module: nn.Module, run_dir: Path, which: str = "ema") -> int:
    """Load the EMA ("ema") or online ("model") weights of a run into `module`; returns their step."""
    return _load_weights(module, Path(run_dir) / (EMA if which == "ema" else MODEL))


def load_checkpoint(run_dir: Path, *, model: nn.Module, ema: nn.Module) -> dict:
    """Restore model, EMA and the trainer state of a run; checks the files belong to one step."""
    state_path = run_dir / STATE
    if not state_path.is_file():
        raise EflowError(f"{run_dir} has no {STATE}: nothing to resume (train without --resume to start)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EflowError(
            f"{state_path} is corrupt ({type(err).__name__}: {err}); restore it or retrain"
        ) from None
    steps = {"model": _load_weights(model, run_dir / MODEL), "ema": _load_weights(ema, run_dir / EMA)}
    if any(s != state["step"] for s in steps.values()):
        raise EflowError(
            f"{run_dir}: checkpoint files disagree on the step ({steps}, trainer state {state['step']})"
        )
    return state
