"""Checkpoints committed as a whole (layout: eflow_core/run_dir.py).

save_checkpoint writes every file of a step into a fresh temp directory, then manifest.json (step, size and
SHA-256 of each file), fsyncs, and commits with one rename to checkpoints/step_N. A crash at any point
leaves the previous checkpoints untouched and at most a temp directory, which the next start removes.
Only then are checkpoints beyond `keep` deleted. Loading verifies the manifest and falls back to the
newest older checkpoint that verifies, saying so.

Under FSDP, save_sharded_checkpoint commits the same way a sharded checkpoint: every rank writes its
shards through torch.distributed.checkpoint into the temp directory's dcp/ (eflow.train.sharded_state),
the ranks hash the files between them, and rank 0 writes config.json, trainer_state.pt (no optimizer:
it is in dcp/) and a manifest listing every file, marked "sharded" with the world size, then renames.
Readers take either layout: `read_weights` and `read_trainer_state` read a sharded checkpoint whole in
one process (sampling, export, a resume without FSDP); load_sharded_checkpoint reshards it over the
ranks of an FSDP run of any world size.
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
    SHARDS,
    STATE,
    TMP_PREFIX,
    checkpoint_dirs,
    latest_checkpoint,
    step_dir_name,
    step_of,
)
from eflow.train import sharded_state
from eflow.train.distributed import World, on_every_rank, on_main

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


def _record(path: Path) -> dict:
    """A file's manifest entry."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def _write_manifest(directory: Path, step: int, files: dict[str, dict], **extra) -> None:
    """manifest.json for `files` (name -> record), then fsync every file and directory of the checkpoint."""
    manifest = {"format": FORMAT, "step": step, "time": time.time(), **extra, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for name in (*files, MANIFEST):
        _fsync(directory / name)
    for folder in sorted({(directory / name).parent for name in files} - {directory}):
        _fsync(folder)
    _fsync(directory)


def _write_full(
    directory: Path,
    *,
    config_json: str,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict,
    hit: Callable[[str], None],
) -> None:
    """Write the files of a full checkpoint and its manifest into the empty `directory`, fsynced."""
    step = int(state["step"])
    (directory / CONFIG).write_text(config_json)
    hit("config")
    save_file(model, str(directory / MODEL), metadata={"step": str(step)})
    hit("model")
    save_file(ema, str(directory / EMA), metadata={"step": str(step)})
    hit("ema")
    torch.save(state, directory / STATE)
    hit("state")
    _write_manifest(
        directory, step, {name: _record(directory / name) for name in (CONFIG, MODEL, EMA, STATE)}
    )
    hit("manifest")


def _prune(run_dir: Path, config_json: str, keep: int) -> None:
    """After a commit: the run's config follows its newest checkpoint; checkpoints beyond `keep` go."""
    atomic_write_text(Path(run_dir) / CONFIG, config_json)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
        _write_full(
            tmp, config_json=config_json, model=_weights(model), ema=_weights(ema), state=state, hit=hit
        )
        os.replace(tmp, final)  # the commit
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hit("committed")
    _prune(run_dir, config_json, keep)
    return final


def save_sharded_checkpoint(
    run_dir: Path,
    *,
    config_json: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module,
    state: dict,
    world: World,
    keep: int = 2,
    crash_point: Callable[[str], None] | None = None,
) -> Path:
    """Commit the checkpoint of state["step"] as checkpoints/step_N in the sharded layout (module
    docstring); every rank must call. `state` holds no optimizer (its shards go to dcp/). A failure on
    any rank raises on every rank, and the committed checkpoints stay as they were. `crash_point(stage)`
    is called on every rank after "shards", on rank 0 after "manifest" and "committed"."""
    step = int(state["step"])
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    hit = crash_point or (lambda stage: None)

    def make_temp() -> Path | None:
        if (final / MANIFEST).is_file():
            return None
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    tmp = on_main(make_temp, world)  # one temp directory, named by rank 0, for every rank
    if tmp is None:
        return final

    def shard_files() -> list[str]:
        return sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDS).rglob("*") if p.is_file())

    def commit() -> None:
        (tmp / CONFIG).write_text(config_json)
        torch.save({**state, "world_size": world.size}, tmp / STATE)
        files = {name: _record(tmp / name) for name in (CONFIG, STATE)}
        files.update(sorted(record for share in shares for record in share.items()))
        _write_manifest(tmp, step, files, sharded=True, world_size=world.size)
        hit("manifest")
        os.replace(tmp, final)  # the commit
        _fsync(root)
        hit("committed")
        _prune(run_dir, config_json, keep)

    try:
        sharded_state.save_state(tmp / SHARDS, model, optimizer, ema)
        hit("shards")
        names = on_main(shard_files, world)
        # every rank hashes its share of the files, rank 0 gets the records
        shares = on_every_rank(lambda: {n: _record(tmp / n) for n in names[world.rank :: world.size]}, world)
        on_main(commit, world)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing once committed
        raise
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
            f"{run_dir} holds no checkpoint (no {CHECKPOINTS}/step_N and no {STATE}): nothing was saved "
            f"there yet (`eflow train --out {run_dir}` writes one; a run that never saved restarts without --resume)"
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


def _manifest(directory: Path) -> dict:
    """The manifest of a committed checkpoint ({} for the flat layout, which has none)."""
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise EflowError(f"{path} is unreadable ({err}); restore it or retrain") from None


def is_sharded(directory: Path) -> bool:
    """Whether the checkpoint in `directory` is sharded (written through torch.distributed.checkpoint)."""
    return bool(_manifest(Path(directory)).get("sharded"))


def _read_shards(directory: Path, part: str) -> dict:
    try:
        return sharded_state.read_part(directory / SHARDS, part)
    except Exception as err:  # whatever the reader hit (a truncated file, a missing part)
        message = str(err).split("\n")[0]
        raise EflowError(
            f"{directory / SHARDS} cannot be read ({type(err).__name__}: {message}); restore it or retrain"
        ) from None


def read_weights(directory: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], int]:
    """The EMA ("ema") or online ("model") weights of the checkpoint in `directory`, whole on the CPU, and
    their step. Either layout: a sharded checkpoint is read by this process alone, no process group."""
    directory = Path(directory)
    if is_sharded(directory):
        return _read_shards(directory, which), int(_manifest(directory)["step"])
    path = directory / (EMA if which == "ema" else MODEL)
    if not path.is_file():
        raise EflowError(f"{path.parent} has no {path.name}: not a complete run directory")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # the step lives in the header metadata
            step = int((f.metadata() or {}).get("step", -1))
    except (SafetensorError, OSError, ValueError) as err:
        raise EflowError(f"{path} is corrupt ({err}); restore it or retrain") from None
    return tensors, step


def _check_fits(own: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], source: Path) -> None:
    """Fail with one line if saved weights (name -> shape) are not those of the model (name -> shape)."""
    wrong = [k for k, shape in saved.items() if k in own and tuple(shape) != tuple(own[k])]
    missing, unexpected = set(own) - set(saved), set(saved) - set(own)
    if missing or unexpected or wrong:
        raise EflowError(
            f"{source} does not fit the model of config.json (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}, other shape {wrong[:3]}); was the config edited after training?"
        )


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}  # a DTensor's shape is the whole one


def _source(directory: Path, which: str) -> Path:
    """Where a checkpoint keeps the weights `which`, for messages."""
    return directory / SHARDS if is_sharded(directory) else directory / (EMA if which == "ema" else MODEL)


def _load_weights(module: nn.Module, directory: Path, which: str) -> int:
    tensors, step = read_weights(directory, which)
    _check_fits(_shapes(module.state_dict()), _shapes(tensors), _source(directory, which))
    module.load_state_dict(tensors)
    return step


def load_weights(module: nn.Module, run_dir: Path, which: str = "ema", warn=None) -> int:
    """Load the EMA ("ema") or online ("model") weights of a run's newest usable checkpoint; returns the step."""
    directory = usable_checkpoint(Path(run_dir), warn)
    return _load_weights(module, directory, which)


def _load_state_file(directory: Path, needs: set[str]) -> dict:
    state_path = directory / STATE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        message = str(err).split("\n")[0]  # not torch's advice to retry with weights_only=False
        raise EflowError(
            f"{state_path} is corrupt or not eflow's ({type(err).__name__}: {message}); restore it or retrain"
        ) from None
    if not isinstance(state, dict) or not needs <= set(state):
        raise EflowError(f"{state_path} is not an eflow trainer state (needs {', '.join(sorted(needs))})")
    return state


def _sharded_state_file(directory: Path) -> dict:
    """A sharded checkpoint's trainer_state.pt (no optimizer), checked against its manifest's step."""
    state = _load_state_file(directory, {"step", "ema_updates"})
    if int(state["step"]) != int(_manifest(directory)["step"]):
        raise EflowError(f"{directory}: {STATE} holds step {state['step']}, its manifest another")
    return state


def read_trainer_state(directory: Path) -> dict:
    """The trainer state of the checkpoint in `directory` with its optimizer state in
    optimizer.state_dict()'s layout; a sharded checkpoint's is read whole, by this process alone."""
    directory = Path(directory)
    if not is_sharded(directory):
        return _load_state_file(directory, {"step", "optimizer", "ema_updates"})
    state = _sharded_state_file(directory)
    return {
        **state,
        "optimizer": sharded_state.optimizer_by_index(_read_shards(directory, sharded_state.OPTIM)),
    }


def load_checkpoint(directory: Path, *, model: nn.Module, ema: nn.Module) -> dict:
    """Restore model and EMA (plain, unsharded modules) from the checkpoint in `directory` (a
    usable_checkpoint) and return its trainer state, optimizer state included; checks they share a
    step. Either layout."""
    directory = Path(directory)
    state = read_trainer_state(directory)
    steps = {"model": _load_weights(model, directory, "model"), "ema": _load_weights(ema, directory, "ema")}
    if any(s != state["step"] for s in steps.values()):
        raise EflowError(
            f"{directory}: checkpoint files disagree on the step ({steps}, trainer state {state['step']})"
        )
    return state


def load_sharded_checkpoint(
    directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module
) -> dict:
    """Restore model, optimizer and EMA from the sharded checkpoint in `directory`, resharded over this
    run's ranks (any world size; every rank must call), and return the trainer state (no optimizer)."""
    directory = Path(directory)
    state = _sharded_state_file(directory)
    for module, part in ((model, sharded_state.MODEL), (ema, sharded_state.EMA)):
        saved = sharded_state.saved_shapes(directory / SHARDS, part)
        _check_fits(_shapes(module.state_dict()), saved, directory / SHARDS)
    try:
        sharded_state.load_state(directory / SHARDS, model, optimizer, ema)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # what a rank raised while loading
        message = str(err).split("\n")[0]
        raise EflowError(
            f"{directory / SHARDS} does not load into this run ({type(err).__name__}: {message}); "
            "was the config edited?"
        ) from None
    return state


def write_full_checkpoint(
    out: Path, *, config_json: str, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], state: dict
) -> Path:
    """Write a full checkpoint (config.json, model.safetensors, ema.safetensors, trainer_state.pt,
    manifest.json) as the new directory `out`, committed by one rename as save_checkpoint commits. Such a
    directory is also a run of the flat layout: eflow sample and --resume take it as it is."""
    out = Path(out)
    if out.exists():
        raise EflowError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_full(tmp, config_json=config_json, model=model, ema=ema, state=state, hit=lambda stage: None)
        os.replace(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
