"""The feature-extractor contract (registry `feature_extractor`) and the runtime's side of it.

A plugin registers `factory(**options)`; the object it returns has

    name: str              the registered name
    dim: int               F, the length of one feature vector
    protocol: dict         JSON-able facts that change the numbers: "resolution", "frames", "input",
                           "features" (which layer), plus anything else (e.g. the call convention)
    content_hash: str      "sha256:<hex>" of the weights, so two eval.json files tell whether they
                           used the same network
    features(videos) -> Tensor    videos: uint8 [B, 3, T, H, W] in 0..255 on the CPU;
                                  returns float [B, F] (any device; the runtime accumulates in float64)

and optionally

    metric_label: str              how its FVD is named in tables and eval.json (default "FVD (<name>)")
    to(device) -> extractor        move the weights; `features` still receives CPU batches
    check_clip_shape((C, T, H, W)) raise EflowError when clips of this shape cannot be used, before
                                   any clip is generated
    classify(videos) -> Tensor     logits [B, K] over the dataset's classes (in-domain classifiers;
                                   used by sample class accuracy)

Clips reach every extractor as uint8 (what a saved video holds): float clips in [-1, 1] are
quantized once by `to_uint8`, round((x + 1) * 127.5) clamped to 0..255, for real and generated
clips alike.

Context options: when the extractor's options model declares a field named in `CONTEXT_OPTIONS`
and the user did not set it, `eflow eval` fills it from the run: `dataset` and `dataset_options`
(the real dataset), `clip_frames`, `clip_height`, `clip_width` (the run's clip shape), `cache_dir`. This is how `indomain` finds the
classifier trained for the run's dataset and clip shape; a third-party extractor can use the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eflow.errors import EflowError
from eflow.registry import get_registry

CONTEXT_OPTIONS = ("dataset", "dataset_options", "clip_frames", "clip_height", "clip_width", "cache_dir")
REQUIRED_ATTRIBUTES = ("name", "dim", "protocol", "content_hash", "features")


def to_uint8(videos: Tensor) -> Tensor:
    """Float clips in [-1, 1] (any shape) -> uint8 in 0..255: round((x + 1) * 127.5), clamped."""
    return ((videos.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_unit_range(videos: Tensor) -> Tensor:
    """uint8 clips in 0..255 -> float32 in [-1, 1]: x / 127.5 - 1."""
    return videos.float() / 127.5 - 1.0


def file_sha256(path: str | Path) -> str:
    """ "sha256:<hex>" of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def create_extractor(name: str, options: dict[str, Any] | None = None, context: dict[str, Any] | None = None):
    """Build extractor `name` with the user's options plus the context options its model declares,
    and check that it honours the contract (a clear error names what is missing)."""
    entry = get_registry("feature_extractor").get(name)
    merged = dict(options or {})
    fields = entry.options.model_fields if entry.options is not None else {}
    for key, value in (context or {}).items():
        if key in CONTEXT_OPTIONS and key in fields and merged.get(key) is None:
            merged[key] = value
    extractor = entry.create(options=merged)
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(extractor, a)]
    if missing:
        raise EflowError(
            f"feature extractor '{name}' (plugin '{entry.owner}') lacks {', '.join(missing)}; "
            "see docs/eval.md for the contract"
        )
    return extractor


def metric_label(extractor) -> str:
    """The name its FVD is shown under ("in-domain FVD", "FVD (i3d)", ...)."""
    return getattr(extractor, "metric_label", None) or f"FVD ({extractor.name})"


def describe(extractor) -> dict[str, Any]:
    """What eval.json records about the extractor."""
    return {
        "name": extractor.name,
        "content_hash": extractor.content_hash,
        "dim": int(extractor.dim),
        "protocol": dict(extractor.protocol),
    }


@torch.no_grad()
def extract(extractor, videos_uint8: Tensor) -> Tensor:
    """Features [B, F] as float64 on the CPU, with the shape checked against the contract."""
    if videos_uint8.dtype != torch.uint8:
        raise TypeError(f"extractors take uint8 clips, got {videos_uint8.dtype}")
    out = extractor.features(videos_uint8)
    if out.ndim != 2 or out.shape != (videos_uint8.shape[0], extractor.dim):
        raise EflowError(
            f"feature extractor '{extractor.name}' returned {list(out.shape)}, expected "
            f"[{videos_uint8.shape[0]}, {extractor.dim}]"
        )
    return out.detach().to("cpu", torch.float64)
