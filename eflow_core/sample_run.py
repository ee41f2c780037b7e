"""`eflow sample` as a function: a loaded run + flags -> the Pipeline's batches -> one set of files.

Generation is eflow.pipeline's (the Python API): videos are generated `sample.batch_size` at a time,
batch b seeded with seed + b * 1,000,003 (the videos depend on the seed and the batch size; a call of at
most batch_size videos is one batch). Here: the flags' checks, the grid (mp4, gif, PNG) of the first
MAX_GRID videos, and with `each` every video as videos/NNNNNN.mp4. All files of one call replace the
previous call's together (eflow.output_set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eflow.data.video_io import write_mp4
from eflow.errors import ConfigError, EflowError
from eflow.loaded_run import LoadedRun
from eflow.memory_budget import is_out_of_memory, out_of_memory_message
from eflow.output_set import output_set
from eflow.pipeline import BATCH_SEED_STRIDE, DEFAULT_CAPTION, Pipeline, generate
from eflow.sampling import write_samples

__all__ = ["BATCH_SEED_STRIDE", "DEFAULT_CAPTION", "MAX_GRID", "SampleResult", "sample_run"]

MAX_GRID = 64  # videos in the mosaic and the PNG grid


@dataclass
class SampleResult:
    """What one `eflow sample` call wrote."""

    num: int
    sampler: str
    steps: int
    guidance: float
    paths: dict[str, Path]  # mp4, gif, png (and videos/ with `each`)


def check_flags(run: LoadedRun, label: int | None, captions: list[str] | None) -> None:
    """--label and --caption against what the run is conditioned on, as errors naming the flags."""
    if run.cfg.data.condition == "text":
        if label is not None:
            raise ConfigError("--label needs a class-conditioned run; this run is conditioned on text")
        return
    if captions:
        raise ConfigError("--caption needs a text-conditioned run (data.condition = text); use --label")
    classes = run.parts.num_classes
    if label is not None and not 0 <= label < classes:
        raise EflowError(f"--label {label} is out of range; this run has classes 0..{classes - 1}")


def sample_run(
    run: LoadedRun,
    out_dir: Path,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    num: int | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    batch_size: int | None = None,
    label: int | None = None,
    captions: list[str] | None = None,
    each: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Sample `num` videos from `run` into `out_dir`; None flags take the run's sample section."""
    check_flags(run, label, captions)
    pipe = Pipeline(run)
    plan = pipe.plan(
        labels=None if label is None else [label],
        prompts=captions or None,
        num=run.cfg.sample.num if num is None and label is not None else num,  # --label: sample.num videos
        steps=steps,
        guidance=guidance,
        seed=seed,
        sampler=sampler,
        batch_size=batch_size,
    )
    n, settings = plan.num, plan.settings
    if n > MAX_GRID and not each:
        raise ConfigError(
            f"--num {n}: the sample grid shows at most {MAX_GRID} videos; add --each to write every video "
            "as its own mp4 (videos/000000.mp4, ...)"
        )
    grid: list[torch.Tensor] = []
    set_names = ("samples.mp4", "samples.gif", "samples.png", "videos")  # all a call may write
    with output_set(out_dir, set_names) as stage:
        try:
            # this module's `generate`, looked up per call, so a caller can watch the batches
            for start, videos in pipe.batches(plan, generate=generate):
                if each:
                    for i, video in enumerate(videos, start=start):
                        write_mp4(stage / "videos" / f"{i:06d}.mp4", video, fps=settings.fps)
                grid.extend(videos[: MAX_GRID - len(grid)])
                if on_batch is not None:
                    on_batch(len(videos), n)  # videos done in this batch, of n
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            doing = f"sampling {plan.batch_size} videos on {run.device}"
            raise EflowError(out_of_memory_message(err, doing, "lower --batch-size")) from None
        staged = write_samples(torch.stack(grid), stage, settings.fps)
        if each:
            staged["videos"] = stage / "videos"
    paths = {kind: out_dir / path.name for kind, path in staged.items()}
    return SampleResult(n, plan.sampler, settings.steps, settings.guidance, paths)
