"""A look at a dataset (what `eflow data preview` writes): its first clips as a mosaic mp4, a gif and a
PNG frame grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eflow.errors import EflowError
from eflow.registry import get_registry
from eflow.sampling import write_samples


def preview_items(
    name: str,
    frames: int,
    height: int,
    width: int,
    *,
    num: int = 8,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The first `num` items of dataset `name` at clips of frames x height x width, those of the first
    item's shape (clips, or images); a dataset of pre-encoded latents has nothing to look at."""
    dataset = get_registry("dataset").create(name, frames, height, width, seed=seed, options=options)
    items = [dataset[i] for i in range(min(num, len(dataset)))]
    if items and "video" not in items[0]:
        raise EflowError(f"dataset '{name}' yields pre-encoded latents, not pixels: nothing to preview")
    return [it for it in items if it["video"].shape == items[0]["video"].shape]


def write_preview(items: list[dict[str, Any]], out: str | Path, stem: str, fps: int = 8) -> dict[str, Path]:
    """Write the items' videos to `out` (mp4, gif, png, named `stem`); returns the paths by kind."""
    videos = torch.stack([it["video"] for it in items])
    try:
        return write_samples(videos, Path(out), fps=fps, stem=stem)
    except OSError as err:
        raise EflowError(f"cannot write to --out {out}: {err.strerror or err}") from None
