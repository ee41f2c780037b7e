"""Experiment trackers: a run's metrics and preview grids mirrored to TensorBoard or Weights & Biases.

    eflow train --track tensorboard            # event files in RUN/tensorboard/
    eflow train --track tensorboard,wandb      # several at once (wandb offline unless WANDB_MODE says)

metrics.jsonl stays the run's record; a tracker gets a copy of what the trainer writes there: every
numeric field of every record (`log(step, record)`, at the record's step, with its `time` as the wall
time) and every preview grid (`image(step, name, path)`, at the index of the last step it shows). The
main rank alone tracks. A resumed run continues the same tracked run: TensorBoard purges the events
at or past the checkpoint's step (purge_step), as metrics.jsonl drops its lines there; W&B resumes the
run id kept in RUN/wandb-run-id. Each tracker is an optional extra: `pip install 'eflow[track]'`
(tensorboard), `pip install 'eflow[wandb]'`; a missing one is a one-line error before training starts.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from eflow.atomic import atomic_write_text
from eflow.errors import ConfigError, EflowError

NOT_SCALARS = ("step", "time")  # the x-axes of a record, not metrics
WANDB_ID = "wandb-run-id"  # RUN/wandb-run-id: the W&B run a resumed run continues


class Tracker(Protocol):
    """What the trainer calls; `step` is the 0-based index of the optimizer step, as in metrics.jsonl."""

    def log(self, step: int, record: Mapping[str, Any]) -> None: ...

    def image(self, step: int, name: str, path: Path) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's metrics: its numeric fields but `step` and `time`."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def missing(package: str, extra: str, tracker: str) -> str:
    return f"--track {tracker} needs the {package} package: pip install 'eflow[{extra}]'"


class TensorBoardTracker:
    """Scalars, preview images and the run's config as TensorBoard events in RUN/tensorboard/."""

    @staticmethod
    def require():
        """torch's SummaryWriter (it needs the tensorboard package)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise EflowError(missing("tensorboard", "track", "tensorboard")) from None
        return SummaryWriter

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        writer_class = self.require()
        # purge_step: events of a crashed run at or past the resumed step are hidden (0: a fresh run)
        self.writer = writer_class(log_dir=str(run_dir / "tensorboard"), purge_step=start_step)
        if start_step == 0:
            self.writer.add_text("config", f"```json\n{json.dumps(config, indent=1)}\n```", 0)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step, walltime=record.get("time"))

    def image(self, step: int, name: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Scalars, preview images and the config as a Weights & Biases run (offline unless WANDB_MODE is set)."""

    @staticmethod
    def require():
        """The wandb module."""
        try:
            import wandb
        except ImportError:
            raise EflowError(missing("wandb", "wandb", "wandb")) from None
        return wandb

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        self.wandb = self.require()
        id_file = run_dir / WANDB_ID
        resumed = start_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else self.wandb.util.generate_id()
        atomic_write_text(id_file, run_id + "\n")
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "eflow"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def tracker_names(names: Iterable[str]) -> list[str]:
    """`names` checked (unknown: the choices; a missing package: the extra to install), duplicates dropped."""
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r} (train.track); choices: {', '.join(TRACKERS)}")
        TRACKERS[name].require()  # the package it needs is installed
        if name not in out:
            out.append(name)
    return out


class Trackers:
    """Several trackers as one (none: every call does nothing). A tracker that fails is switched off
    with a warning; training and metrics.jsonl go on."""

    def __init__(self, trackers: Mapping[str, Tracker] | None = None, warn: Callable[[str], None] = print):
        self.trackers = dict(trackers or {})
        self.warn = warn

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as err:  # a tracker's trouble must not stop the run
                self.trackers.pop(name)
                with contextlib.suppress(Exception):  # release what it holds (files, a writer thread)
                    tracker.close()
                self.warn(
                    f"tracker {name} failed ({type(err).__name__}: {err}); it is off for the rest of the run"
                )

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self._each(lambda tracker: tracker.log(step, record))

    def image(self, step: int, name: str, path: Path | None) -> None:
        if path is not None:
            self._each(lambda tracker: tracker.image(step, name, path))

    def close(self) -> None:
        """Flush and close every tracker (again: nothing)."""
        self._each(lambda tracker: tracker.close())
        self.trackers = {}


def open_trackers(
    names: Iterable[str],
    run_dir: Path,
    start_step: int,
    config: dict[str, Any],
    warn: Callable[[str], None] = print,
) -> Trackers:
    """The trackers `names` of the run in `run_dir`, continuing from `start_step` (0: a fresh run); if one
    cannot start, those already open are closed before the error goes on."""
    opened = Trackers(warn=warn)
    try:
        for name in tracker_names(names):
            opened.trackers[name] = TRACKERS[name](run_dir, start_step, config)
    except BaseException:
        opened.close()
        raise
    return opened
