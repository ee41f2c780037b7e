"""`eflow sample` as a function: a loaded run + flags -> conditions -> batched generation -> one set of files.

Videos are generated `sample.batch_size` at a time, batch b seeded with seed + b * 1,000,003 (the
videos depend on the seed and the batch size; a call of at most batch_size videos is one batch); the grid (mp4, gif, PNG) shows the first
MAX_GRID videos, and `each` also writes every video as videos/NNNNNN.mp4. All files of one call
replace the previous call's together (eflow.output_set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eflow.condition import Condition
from eflow.config import sampling_settings
from eflow.data.video_io import write_mp4
from eflow.errors import ConfigError, EflowError
from eflow.loaded_run import LoadedRun
from eflow.memory_budget import check_fits, is_out_of_memory, out_of_memory_message, sampling_need
from eflow.output_set import output_set
from eflow.registry import get_registry
from eflow.sampling import generate, sample_labels, sampler_name, write_samples

MAX_GRID = 64  # videos in the mosaic and the PNG grid
DEFAULT_CAPTION = "a red square moving left"  # a text-conditioned run sampled without --caption
BATCH_SEED_STRIDE = 1_000_003


@dataclass
class SampleResult:
    """What one `eflow sample` call wrote."""

    num: int
    sampler: str
    steps: int
    guidance: float
    paths: dict[str, Path]  # mp4, gif, png (and videos/ with `each`)


def conditions(run: LoadedRun, num: int, label: int | None, captions: list[str] | None):
    """A function (start, stop) -> the Condition of videos start..stop-1: class labels in turn (or
    `label`), or the captions in turn, encoded one batch at a time."""
    parts = run.parts
    if run.cfg.data.condition == "text":
        if label is not None:
            raise ConfigError("--label needs a class-conditioned run; this run is conditioned on text")
        texts = captions or [DEFAULT_CAPTION]
        return lambda start, stop: parts.conditioner.captions(
            [texts[i % len(texts)] for i in range(start, stop)], run.device
        )
    if captions:
        raise ConfigError("--caption needs a text-conditioned run (data.condition = text); use --label")
    labels = sample_labels(num, parts.num_classes, label)
    return lambda start, stop: Condition(labels=labels[start:stop])


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
    if num is None and captions:
        num = len(captions)
    settings = sampling_settings(
        run.cfg.sample,
        steps=steps,
        guidance=guidance,
        num=num,
        seed=seed,
        sampler=sampler,
        batch_size=batch_size,
    )
    run.cfg.sample = settings
    name = sampler_name(run.cfg)
    get_registry("sampler").get(name)  # an unknown --sampler fails here, listing the choices
    n = settings.num
    if n > MAX_GRID and not each:
        raise ConfigError(
            f"--num {n}: the sample grid shows at most {MAX_GRID} videos; add --each to write every video "
            "as its own mp4 (videos/000000.mp4, ...)"
        )
    condition_of = conditions(run, n, label, captions)
    batch = min(settings.batch_size, n)
    parts, cfg = run.parts, run.cfg
    clip = (cfg.data.frames, cfg.data.height, cfg.data.width)
    hint = "lower --batch-size"
    check_fits(
        sampling_need(parts.model, clip, parts.latent_shape, batch, run.precision == "bf16"), run.device, hint
    )
    grid: list[torch.Tensor] = []
    with output_set(out_dir) as stage:
        for b, start in enumerate(range(0, n, batch)):
            stop = min(start + batch, n)
            try:
                videos = generate(
                    parts.model,
                    parts.autoencoder,
                    condition_of(start, stop),
                    parts.latent_shape,
                    sampler=name,
                    sampler_options=settings.sampler_options,
                    steps=settings.steps,
                    guidance=settings.guidance,
                    seed=settings.seed + b * BATCH_SEED_STRIDE,
                    device=run.device,
                    precision=run.precision,
                )
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                raise EflowError(
                    out_of_memory_message(err, f"sampling {batch} videos on {run.device}", hint)
                ) from None
            if each:
                for i, video in enumerate(videos, start=start):
                    write_mp4(stage / "videos" / f"{i:06d}.mp4", video, fps=settings.fps)
            grid.extend(videos[: MAX_GRID - len(grid)])
            if on_batch is not None:
                on_batch(stop - start, n)  # videos done in this batch, of n
        staged = write_samples(torch.stack(grid), stage, settings.fps)
        if each:
            staged["videos"] = stage / "videos"
    paths = {kind: out_dir / path.name for kind, path in staged.items()}
    return SampleResult(n, name, settings.steps, settings.guidance, paths)
