"""A trained run as a Python pipeline, called the way a diffusers pipeline is called.

    import torch
    from eflow import Pipeline

    pipe = Pipeline.from_run("runs/demo", device="cuda")
    out = pipe(labels=[3, 5], steps=4, guidance=4.0, generator=torch.Generator("cuda").manual_seed(0))
    out.save("out.mp4")                                  # the videos tiled, as `eflow sample` writes them
    frames = pipe(prompts=["a red square moving left"], output_type="pil").videos   # a text run

Unset arguments take the run's [sample] section (steps, guidance, seed, sampler, batch size, fps).
Videos are generated `batch_size` at a time. With `seed` (or with neither seed nor generator: the run's
sample.seed) batch b is seeded with seed + b * BATCH_SEED_STRIDE; `eflow sample` is this pipeline plus
files (eflow.sample_run), so the same seed and batch size give it the same videos. With `generator`, the
noise of every batch (and a re-noising sampler's draws) come from that generator in turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from eflow.assembly import resolve_device
from eflow.condition import Condition
from eflow.config import SampleSection, sampling_settings
from eflow.data.video_io import to_uint8, write_gif, write_grid_png, write_mp4
from eflow.errors import ConfigError, EflowError
from eflow.loaded_run import LoadedRun, load_run
from eflow.memory_budget import check_fits, sampling_need
from eflow.registry import get_registry
from eflow.sampler import StepCallback, takes_callback
from eflow.sampling import generate, sampler_name, sampling_notes, tile

BATCH_SEED_STRIDE = 1_000_003  # batch b of a call is seeded with seed + b * BATCH_SEED_STRIDE
DEFAULT_CAPTION = "a red square moving left"  # a text-conditioned run called without prompts
OUTPUT_TYPES = ("tensor", "numpy", "pil")
OutputType = Literal["tensor", "numpy", "pil"]
SAVE_SUFFIXES = (".mp4", ".gif", ".png")


@dataclass
class Plan:
    """One call, checked: its settings, sampler and conditions, before anything is generated."""

    settings: SampleSection  # steps, guidance, num, seed, batch_size, sampler_options, fps
    sampler: str
    labels: Tensor | None  # [num] class ids of a class-conditioned run
    prompts: list[str] | None  # [num] captions of a text-conditioned run
    generator: torch.Generator | None  # None: batch b seeded with settings.seed + b * BATCH_SEED_STRIDE
    reports_steps: bool  # the sampler calls back after each step
    # what the caller should know: settings the run was not trained for (eflow.sampling.sampling_notes), captions
    notes: list[str] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.settings.num

    @property
    def batch_size(self) -> int:
        return min(self.settings.batch_size, self.settings.num)

    @property
    def num_batches(self) -> int:
        return -(-self.num // self.batch_size)


@dataclass
class PipelineOutput:
    """What a pipeline call made: `videos` as `output_type` asked, plus what `save` writes."""

    videos: Any  # tensor [B, C, T, H, W] in [-1, 1]; numpy uint8 [B, T, H, W, C]; pil: B lists of frames
    tensor: Tensor  # [B, C, T, H, W] float in [-1, 1] on the CPU, whatever the output_type
    fps: int
    sampler: str
    steps: int
    guidance: float
    seed: int | None  # None when a generator drew the noise

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def save(self, path: str | Path, fps: int | None = None) -> Path:
        """Write the videos by the suffix of `path`: .mp4 or .gif (all videos tiled, up to 4 a row, as
        `eflow sample` writes them) or .png (a frame grid, one row per video); returns the path."""
        return save_videos(self.tensor, path, fps or self.fps)


def save_videos(videos: Tensor, path: str | Path, fps: int) -> Path:
    """[B, C, T, H, W] (or one [C, T, H, W]) in [-1, 1] -> an .mp4, .gif or .png at `path`."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_SUFFIXES:
        raise EflowError(f"cannot save videos as {path.name!r}: use a name ending in .mp4, .gif or .png")
    if videos.dim() == 4:
        videos = videos[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return write_grid_png(path, videos)
    writer = write_mp4 if suffix == ".mp4" else write_gif
    return writer(path, tile(videos), fps=fps)


def convert(videos: Tensor, output_type: str) -> Any:
    """[B, C, T, H, W] in [-1, 1] -> the tensor itself, uint8 numpy [B, T, H, W, C], or PIL frames."""
    if output_type == "tensor":
        return videos
    frames = to_uint8(videos)  # [B, T, H, W, C]
    if output_type == "numpy":
        return frames
    from PIL import Image

    return [[Image.fromarray(frame) for frame in video] for video in frames]


def _in_turn(items: Sequence, num: int) -> list:
    """`num` items taken from `items` in turn."""
    return [items[i % len(items)] for i in range(num)]


class Pipeline:
    """Sample videos from a trained run in Python: `Pipeline.from_run(dir)(labels=... | prompts=...)`."""

    def __init__(self, run: LoadedRun):
        self.run = run

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str | torch.device = "auto", weights: str = "ema"
    ) -> Pipeline:
        """Load the run in `run_dir` (its config.json and EMA or online weights) onto `device`."""
        device = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(load_run(run_dir, device, weights))

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def condition(self) -> str:
        """What the run is conditioned on: "label" or "text"."""
        return self.run.cfg.data.condition

    @property
    def num_classes(self) -> int | None:
        return self.run.parts.num_classes

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names (labels.json of the run), index = class id; None if not recorded."""
        from eflow.train.trainer import LABELS

        path = self.run.run_dir / LABELS
        return json.loads(path.read_text())["classes"] if path.is_file() else None

    def __repr__(self) -> str:
        return (
            f"Pipeline({str(self.run.run_dir)!r}, step={self.run.step}, weights={self.run.weights!r}, "
            f"condition={self.condition!r}, device={str(self.device)!r})"
        )

    # ----- planning ------------------------------------------------------------------------------
    def plan(
        self,
        labels: int | str | Sequence[int | str] | Tensor | None = None,
        prompts: str | Sequence[str] | None = None,
        *,
        num: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        sampler_options: dict[str, Any] | None = None,
    ) -> Plan:
        """Check a call and fix its conditions: one video per label or prompt, or `num` of them taken in
        turn; no labels: the classes in turn (num: the run's sample.num). sampler_options: over the run's
        (e.g. {"shift": 1.0}), checked against the sampler's options."""
        if seed is not None and generator is not None:
            raise ConfigError("give seed or generator, not both")
        if isinstance(labels, Tensor):
            labels = labels.flatten().tolist()
        labels = [labels] if isinstance(labels, (int, str)) else labels
        prompts = [prompts] if isinstance(prompts, str) else prompts
        given = labels if labels is not None else prompts
        if num is None and given is not None and len(given) > 0:
            num = len(given)
        settings = sampling_settings(
            self.run.cfg.sample,
            steps=steps,
            guidance=guidance,
            num=num,
            seed=seed,
            sampler=sampler,
            batch_size=batch_size,
            sampler_options=sampler_options,
        )
        name = sampler_name(self.run.cfg.model_copy(update={"sample": settings}))
        impl = get_registry("sampler").create(name, options=settings.sampler_options)  # unknown: the choices
        plan = Plan(settings, name, None, None, generator, takes_callback(impl))
        plan.notes = sampling_notes(self.run.cfg, settings)
        if self.condition == "text":
            if labels is not None:
                raise ConfigError("labels need a class-conditioned run; this run is conditioned on text")
            plan.prompts = _in_turn(list(prompts or [DEFAULT_CAPTION]), settings.num)
            if not prompts:
                plan.notes.append(f"no caption given: every video shows {DEFAULT_CAPTION!r} (--caption TEXT)")
            elif len(prompts) < settings.num:
                plan.notes.append(f"{len(prompts)} caption(s) taken in turn for {settings.num} videos")
        else:
            if prompts is not None:
                raise ConfigError("prompts need a text-conditioned run (data.condition = text); give labels")
            plan.labels = self._label_ids(labels, settings.num)
        run = self.run
        clip = (run.cfg.data.frames, run.cfg.data.height, run.cfg.data.width)
        need = sampling_need(
            run.parts.model, clip, run.parts.latent_shape, plan.batch_size, run.precision == "bf16"
        )
        check_fits(need, run.device, "lower the batch size (--batch-size)")
        return plan

    def _label_ids(self, labels, num: int) -> Tensor:
        """[num] class ids: `labels` (ids or class names) in turn, or the classes in turn."""
        classes = self.num_classes
        if labels is None:
            return torch.arange(num) % classes
        if len(labels) == 0:
            raise ConfigError("labels is empty; give at least one class id")
        ids = []
        for label in labels:
            if isinstance(label, str):
                names = self.class_names or []
                if label not in names:
                    known = ", ".join(names) if names else "none recorded (no labels.json)"
                    raise ConfigError(f"unknown class name {label!r}; class names: {known}")
                label = names.index(label)
            if not 0 <= int(label) < classes:
                raise ConfigError(f"label {label} is out of range; this run has classes 0..{classes - 1}")
            ids.append(int(label))
        return torch.tensor(_in_turn(ids, num), dtype=torch.long)

    def conditions(self, plan: Plan, start: int, stop: int) -> Condition:
        """The Condition of videos start..stop-1 of `plan` (captions encoded here, one batch at a time)."""
        if plan.prompts is not None:
            return self.run.parts.conditioner.captions(plan.prompts[start:stop], self.device)
        return Condition(labels=plan.labels[start:stop])

    # ----- generating ----------------------------------------------------------------------------
    def batches(
        self,
        plan: Plan,
        *,
        callback: StepCallback | None = None,
        generate: Callable[..., Tensor] = generate,
        only: Container[int] | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """(index of its first video, videos [b, C, T, H, W] in [-1, 1] on the CPU) for each batch of
        `plan`, made by `generate` (eflow.sampling's; a caller may pass a wrapper of it). only: the
        indices of the batches to make (default all); a batch's seed depends on its index alone."""
        parts, s = self.run.parts, plan.settings
        if only is not None and plan.generator is not None:
            raise ConfigError(
                "batches(only=...) needs a plan seeded by `seed`: with a `generator` every batch draws from "
                "the one before it, so a batch made alone would differ"
            )
        for b, start in enumerate(range(0, plan.num, plan.batch_size)):
            if only is not None and b not in only:
                continue
            stop = min(start + plan.batch_size, plan.num)
            videos = generate(
                parts.model,
                parts.autoencoder,
                self.conditions(plan, start, stop),
                parts.latent_shape,
                sampler=plan.sampler,
                sampler_options=s.sampler_options,
                steps=s.steps,
                guidance=s.guidance,
                device=self.device,
                precision=self.run.precision,
                seed=None if plan.generator is not None else s.seed + b * BATCH_SEED_STRIDE,
                generator=plan.generator,
                callback=callback,
            )
            yield start, videos

    def __call__(
        self,
        labels: int | str | Sequence[int | str] | Tensor | None = None,
        prompts: str | Sequence[str] | None = None,
        *,
        num: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        sampler_options: dict[str, Any] | None = None,
        output_type: OutputType = "tensor",
        progress: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> PipelineOutput:
        """Generate videos for `labels` (class ids or names) or `prompts`, one each (or `num` in turn).

        output_type: "tensor" (float [B, C, T, H, W] in [-1, 1]), "numpy" (uint8 [B, T, H, W, C]) or
        "pil" (per video, a list of PIL frames). progress: a bar on stderr, one tick per sampler step.
        callback_on_step_end(step, total, latents): after each sampler step of each batch, with the
        latents [b, c, t, h, w] after that step (its return value is ignored)."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r}: choose {', '.join(OUTPUT_TYPES)}")
        plan = self.plan(
            labels,
            prompts,
            num=num,
            steps=steps,
            guidance=guidance,
            seed=seed,
            generator=generator,
            sampler=sampler,
            batch_size=batch_size,
            sampler_options=sampler_options,
        )
        if callback_on_step_end is not None and not plan.reports_steps:
            raise EflowError(
                f"sampler '{plan.sampler}' reports no steps (its sample() takes no `callback`), so "
                "callback_on_step_end cannot be called; use a sampler that does (euler, solution)"
            )
        steps_total = plan.num_batches * plan.settings.steps
        with progress_bar(progress, steps_total) as tick:

            def on_step(step: int, total: int, latents: Tensor) -> None:
                tick(1)
                if callback_on_step_end is not None:
                    callback_on_step_end(step, total, latents)

            callback = on_step if plan.reports_steps else None
            parts = []
            for _, videos in self.batches(plan, callback=callback):
                parts.append(videos)
                if callback is None:
                    tick(plan.settings.steps)
        videos = torch.cat(parts)
        s = plan.settings
        return PipelineOutput(
            convert(videos, output_type),
            videos,
            s.fps,
            plan.sampler,
            s.steps,
            s.guidance,
            None if generator is not None else s.seed,
        )

    def save(self, videos: PipelineOutput | Tensor, path: str | Path, fps: int | None = None) -> Path:
        """Write a call's videos (or a tensor [B, C, T, H, W] in [-1, 1]) to an .mp4, .gif or .png."""
        if isinstance(videos, PipelineOutput):
            return videos.save(path, fps)
        if not isinstance(videos, Tensor):
            raise EflowError("save takes a pipeline output or a float tensor [B, C, T, H, W] in [-1, 1]")
        return save_videos(videos, path, fps or self.run.cfg.sample.fps)


@contextmanager
def progress_bar(show: bool, total: int) -> Iterator[Callable[[int], None]]:
    """`tick(n)` advancing a transient rich bar of `total` on stderr (a no-op when `show` is False)."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]sample[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sample", total=total)
        yield lambda n: bar.update(task, advance=n)
