"""Sampling driver: noise -> sampler plugin -> latents -> autoencoder -> videos, and the files people look at."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from eflow.condition import Condition
from eflow.config import RunConfig, SampleSection
from eflow.data.video_io import write_gif, write_grid_png, write_mp4
from eflow.errors import EflowError
from eflow.registry import get_registry
from eflow.sampler import StepCallback, takes_callback
from eflow.timesteps import randn


def sampler_name(cfg: RunConfig) -> str:
    """The run's sampler: the configured one, else the one its objective was trained for."""
    if cfg.sample.sampler:
        return cfg.sample.sampler
    return get_registry("objective").get(cfg.objective.name).capability("default_sampler")


def sampling_notes(cfg: RunConfig, settings: SampleSection) -> list[str]:
    """What a user should know about sampling run `cfg` with `settings` (its sample section with the
    call's flags): a sampler other than the one its objective trains for, and for an objective whose
    sampling is part of what it learned (capability trained_sampling: MLCD's segments, w, shift), every
    setting that differs from the run's."""
    objective = get_registry("objective").get(cfg.objective.name)
    own = objective.capability("default_sampler")
    chosen = settings.sampler or own
    notes = []
    if chosen != own:
        notes.append(
            f"sampler '{chosen}' is not the one {cfg.objective.name} runs are trained for ('{own}'); "
            "unless it reads the model's output the same way, expect poor samples"
        )
    if objective.capability("trained_sampling"):
        saved = cfg.sample
        asked = {"steps": settings.steps, "guidance": settings.guidance, **settings.sampler_options}
        trained = {"steps": saved.steps, "guidance": saved.guidance, **saved.sampler_options}
        changed = [f"{k} {asked.get(k)} (trained {v})" for k, v in trained.items() if asked.get(k) != v]
        if changed and chosen == own:
            notes.append(
                f"this {cfg.objective.name} run was trained for its own sampling settings; this call "
                f"changes {', '.join(changed)}"
            )
    return notes


def sample_labels(num: int, num_classes: int, label: int | None) -> Tensor:
    """`label` for every video, or the classes in turn."""
    if label is not None:
        if not 0 <= label < num_classes:
            raise EflowError(f"--label {label} is out of range; this run has classes 0..{num_classes - 1}")
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num) % num_classes


@torch.no_grad()
def generate(
    model: nn.Module,
    autoencoder,
    cond: Condition,
    latent_shape: tuple[int, ...],
    *,
    sampler: str,
    sampler_options: dict | None,
    steps: int,
    guidance: float,
    device: torch.device,
    precision: str = "fp32",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Videos [B, C, T, H, W] in [-1, 1] on the CPU, one per condition `cond`: noise from `generator`, else
    from a generator on `device` seeded with `seed`; `callback(step, total, latents)` after each sampler
    step. The one generation function: the training previews, `eflow eval` and eflow.pipeline use it."""
    model.eval()
    impl = get_registry("sampler").create(sampler, options=sampler_options)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    noise = randn((len(cond), *latent_shape), generator, device)  # [B, c, t, h, w]
    step_reports = {}
    if callback is not None:
        if not takes_callback(impl):
            raise EflowError(f"sampler '{sampler}' reports no steps (its sample() takes no `callback`)")
        step_reports["callback"] = callback
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )
    with autocast:
        latents = impl.sample(
            model, noise, cond.to(device), steps, guidance, generator=generator, **step_reports
        )
    return autoencoder.decode(latents.float()).clamp(-1, 1).cpu()


def tile(videos: Tensor, gutter: int = 2) -> Tensor:
    """[B, C, T, H, W] -> one mosaic video [C, T, rows*H, cols*W] with white gutters."""
    b, c, t, h, w = videos.shape
    cols = min(b, 4)
    rows = (b + cols - 1) // cols
    out = videos.new_ones(c, t, rows * (h + gutter) - gutter, cols * (w + gutter) - gutter)
    for i in range(b):
        r, k = divmod(i, cols)
        out[:, :, r * (h + gutter) : r * (h + gutter) + h, k * (w + gutter) : k * (w + gutter) + w] = videos[
            i
        ]
    return out


def write_samples(videos: Tensor, out_dir: Path, fps: int, stem: str = "samples") -> dict[str, Path]:
    """Write the mosaic as mp4 and gif plus a PNG frame grid (one row per video); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mosaic = tile(videos)
    paths = {"mp4": out_dir / f"{stem}.mp4", "gif": out_dir / f"{stem}.gif", "png": out_dir / f"{stem}.png"}
    write_mp4(paths["mp4"], mosaic, fps=fps)
    write_gif(paths["gif"], mosaic, fps=fps)
    write_grid_png(paths["png"], videos)
    return paths
