"""Checkpoints committed as a whole (layout: eflow_core/run_dir.py).

save_checkpoint writes every file of a step into a fresh temp directory, then manifest.json (step, size and
SHA-256 of each file), fsyncs, and commits with one rename to checkpoints/step_N. A crash at any point
leaves the previous checkpoints untouched and at most a temp directory, which the next start removes.
Only then are checkpoints beyond `keep` deleted. Loading verifies the manifest and falls back to the
newest older checkpoint that verifies, saying so. torch.distributed.checkpoint directories can commit the
same way: written into the temp directory, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from eflow.atomic import atomic_write_text
from eflow.errors import EflowError
from eflow.run_dir import (
    CHECKPOINTS,
    CONFIG,
    EMA,
    MANIFEST,
    METRICS,
    MODEL,
    SAMPLES,
    STATE,
    TMP_PREFIX,
    checkpoint_dirs,
    latest_checkpoint,
    step_dir_name,
    step_of,
)

FORMAT = 1  # manifest format version


def sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    *,
    config_json: str,
    model: nn.Module,
    ema: nn.Module,
    state: dict,
    keep: int = 2,
    crash_point: Callable[[str], None] | None = None,
) -> Path:
    """Commit the checkpoint of state["step"] as checkpoints/step_N (see the module docstring); returns it.

    A step that is already committed is left as it is. `crash_point(stage)` is called between the stages
    (for fault-injection tests)."""
    step = int(state["step"])
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    hit = crash_point or (lambda stage: None)
    try:
        (tmp / CONFIG).write_text(config_json)
        hit("config")
        save_file(_weights(model), str(tmp / MODEL), metadata={"step": str(step)})
        hit("model")
        save_file(_weights(ema), str(tmp / EMA), metadata={"step": str(step)})
        hit("ema")
        torch.save(state, tmp / STATE)
        hit("state")
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
            for name in (CONFIG, MODEL, EMA, STATE)
        }
        manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for name in (*files, MANIFEST):
            _fsync(tmp / name)
        _fsync(tmp)
        hit("manifest")
        os.replace(tmp, final)  # the commit
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hit("committed")
    atomic_write_text(Path(run_dir) / CONFIG, config_json)  # the run's config follows its newest checkpoint
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what interrupted saves left: temp checkpoint directories and `.name.XXXX.tmp*` files."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if run_dir.is_dir():
        for p in run_dir.glob(".*.tmp*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def remove_run(run_dir: Path) -> None:
    """Delete a run's own files (config, checkpoints, metrics, samples), nothing else in the directory."""
    for name in (CONFIG, MODEL, EMA, STATE, METRICS):
        (run_dir / name).unlink(missing_ok=True)
    for name in (SAMPLES, CHECKPOINTS):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def move_run_aside(run_dir: Path) -> Path:
    """Move a run's own files into RUN/.replaced-<time>/ (kept until the new run's first checkpoint)."""
    aside = run_dir / f".replaced-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    aside.mkdir()
    for name in (CONFIG, MODEL, EMA, STATE, METRICS, SAMPLES, CHECKPOINTS):
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return aside


def verify(directory: Path) -> str | None:
    """None if the checkpoint in `directory` matches its manifest, else what is wrong."""
    path = directory / MANIFEST
    if not path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, record in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {record['bytes']}"
        if sha256(file) != record["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (changed or damaged on disk)"
    return None


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories to try, newest first (the flat layout's RUN last)."""
    dirs = checkpoint_dirs(run_dir)[::-1]
    if (run_dir / STATE).is_file():
        dirs.append(run_dir)
    return dirs


def usable_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path:
    """The newest checkpoint directory that verifies; older ones are tried with a warning each."""
    run_dir = Path(run_dir)
    candidates = _candidates(run_dir)
    if not candidates:
        raise EflowError(
            f"{run_dir} holds no checkpoint (no {CHECKPOINTS}/step_N and no {STATE}); train without --resume"
        )
    problems = []
    for directory in candidates:
        problem = verify(directory) if directory != run_dir else None
        if problem is None:
            for skipped, why in problems:
                if warn is not None:
                    warn(f"checkpoint {skipped} is unusable ({why}); using {directory.name or directory}")
            return directory
        problems.append((directory.name, problem))
    raise EflowError(
        f"{run_dir}: no usable checkpoint: "
        + "; ".join(f"{name}: {why}" for name, why in problems)
        + "; restore one from a backup or retrain"
    )


def _load_weights(module: nn.Module, path: Path) -> int:
    if not path.is_file():
        raise EflowError(f"{path.parent} has no {path.name}: not a complete run directory")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # the step lives in the header metadata
            step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError) as err:
        raise EflowError(f"{path} is corrupt ({err}); restore it or retrain") from None
    own = module.state_dict()
    wrong = [k for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing or unexpected or wrong:
        raise EflowError(
            f"{path} does not fit the model of config.json (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}, other shape {wrong[:3]}); was the config edited after training?"
        )
    module.load_state_dict(tensors)
    return step


def load_weights(module: nn.Module, run_dir: Path, which: str = "ema", warn=None) -> int:
    """Load the EMA ("ema") or online ("model") weights of a run's newest usable checkpoint; returns the step."""
    directory = usable_checkpoint(Path(run_dir), warn)
    return _load_weights(module, directory / (EMA if which == "ema" else MODEL))


def load_checkpoint(run_dir: Path, *, model: nn.Module, ema: nn.Module, warn=None) -> dict:
    """Restore model, EMA and the trainer state of the newest usable checkpoint; checks they share a step."""
    directory = usable_checkpoint(Path(run_dir), warn)
    state_path = directory / STATE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        message = str(err).split("\n")[0]  # not torch's advice to retry with weights_only=False
        raise EflowError(
            f"{state_path} is corrupt or not eflow's ({type(err).__name__}: {message}); restore it or retrain"
        ) from None
    if not isinstance(state, dict) or not {"step", "optimizer", "ema_updates"} <= set(state):
        raise EflowError(f"{state_path} is not an eflow trainer state (needs step, optimizer, ema_updates)")
    steps = {"model": _load_weights(model, directory / MODEL), "ema": _load_weights(ema, directory / EMA)}
    if any(s != state["step"] for s in steps.values()):
        raise EflowError(
            f"{directory}: checkpoint files disagree on the step ({steps}, trainer state {state['step']})"
        )
    return state


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict, run_dir: Path) -> None:
    """optimizer.load_state_dict(saved), failing with one line if the saved state does not fit the model
    (other parameter groups, counts or moment shapes: the config changed, or the file is not this run's)."""
    where = f"{run_dir}: the trainer state's optimizer"
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise EflowError(f"{where} does not fit this model ({err}); was the config edited?") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise EflowError(
                        f"{where} holds {name} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(param.shape)}; was the config edited?"
                    )


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's newest checkpoint (its directory's name; the trainer state's in the flat
    layout); None without one."""
    latest = latest_checkpoint(Path(run_dir))
    if latest is None:
        return None
    step = step_of(latest)
    if step is not None:
        return step
    return int(torch.load(latest / STATE, map_location="cpu", weights_only=True)["step"])


def has_checkpoint(run_dir: Path) -> bool:
    """Whether RUN holds a checkpoint to resume (committed, or the flat layout)."""
    return latest_checkpoint(run_dir) is not None
