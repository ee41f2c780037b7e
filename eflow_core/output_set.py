"""Files written as one set: staged in a temp directory, then moved into place together.

    with output_set(out_dir) as stage:
        write_mp4(stage / "samples.mp4", ...)
        write_gif(stage / "samples.gif", ...)

On success every entry of the stage replaces the entry of the same name in `out_dir` (a directory such
as videos/ is replaced whole), with SIGINT and SIGTERM held back during the renames; on any failure,
Ctrl-C included, the stage is deleted and `out_dir` keeps its previous set. Stages left by a killed
process are removed the next time a set is written to the same directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

STAGE_PREFIX = ".tmp-set-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_stages(out_dir: Path) -> None:
    """Delete stages whose writer (the pid in the name) no longer runs."""
    for stage in out_dir.glob(f"{STAGE_PREFIX}*"):
        pid = stage.name[len(STAGE_PREFIX) :].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (delivered on exit) where the platform allows it."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _commit(stage: Path, out_dir: Path, names: tuple[str, ...]) -> None:
    """Move every entry of `stage` over its namesake in `out_dir`; an entry of `names` (the set's possible
    members) that this set lacks is removed, so no member of an earlier set stays beside the new one."""
    with _signals_held():
        staged = {entry.name for entry in stage.iterdir()}
        for name in names:
            if name not in staged and (out_dir / name).exists():
                os.replace(out_dir / name, stage / f".old-{name}")  # deleted with the stage
        for entry in sorted(stage.iterdir()):
            if entry.name.startswith(".old-"):
                continue
            target = out_dir / entry.name
            if entry.is_dir() and target.is_dir():  # replace a folder whole: no old files mixed in
                old = stage / f".old-{entry.name}"
                os.replace(target, old)
                os.replace(entry, target)
            else:
                os.replace(entry, target)


@contextlib.contextmanager
def output_set(out_dir: str | Path, names: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a stage directory inside `out_dir`; commit its entries together on success. `names`: every
    entry a set may hold (those the new set lacks are removed at the commit)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_stages(out_dir)
    stage = out_dir / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    stage.mkdir()
    try:
        yield stage
        _commit(stage, out_dir, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
