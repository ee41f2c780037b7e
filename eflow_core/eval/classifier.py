"""The in-domain video classifier: a small 3D-conv network, its checkpoint file and where it is cached.

Network (width w): three stages of Conv3d 3x3x3 -> GroupNorm -> SiLU with 3 -> w -> 2w -> 4w
channels, 2x max pooling after the first two stages (1x2x2, then 2x2x2; an axis of size 1 is not
pooled), a global mean over (T, H, W) giving the features [B, 4w] (the penultimate layer), and a
linear head to the class logits [B, K]. Input: clips [B, 3, T, H, W] in [-1, 1].

Checkpoint: one safetensors file whose header metadata "eflow" holds JSON: the architecture, the
dataset name and resolved options, the clip shape, the class names, the held-out accuracy (overall
and per class) and how it was trained. It lives in <cache>/extractors/ under a name keyed by
(dataset + options, clip shape, CLASSIFIER_VERSION); `eflow eval` looks it up there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from eflow.atomic import atomic_path
from eflow.errors import EflowError
from eflow.eval.cache import EXTRACTORS, cache_key, cache_root, safe_name

CLASSIFIER_VERSION = 1  # bump when the architecture or the input convention changes


class VideoClassifier(nn.Module):
    """Clips [B, 3, T, H, W] in [-1, 1] -> logits [B, K]; `features` gives the pooled [B, 4w] layer."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        channels = [in_channels, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv3d(channels[i], channels[i + 1], 3, padding=1) for i in range(3))
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, channels[i + 1]), channels[i + 1]) for i in range(3))
        self.head = nn.Linear(channels[-1], num_classes)
        self.num_classes, self.width, self.dim = num_classes, width, channels[-1]

    def features(self, x: Tensor) -> Tensor:
        """[B, 3, T, H, W] -> [B, 4w], the global mean of the last conv stage."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.silu(norm(conv(x)))
            if i < 2:
                x = _pool(x, temporal=i == 1)
        return x.mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _pool(x: Tensor, temporal: bool) -> Tensor:
    """2x max pooling over (H, W) (and T if `temporal`), skipping axes of size 1."""
    t, h, w = x.shape[2:]
    kernel = (2 if temporal and t > 1 else 1, 2 if h > 1 else 1, 2 if w > 1 else 1)
    return F.max_pool3d(x, kernel, ceil_mode=True)


def resolve_dataset_options(dataset: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The dataset's options with defaults filled in (so {} and the explicit defaults share a key)."""
    from eflow.registry import get_registry

    parsed = get_registry("dataset").get(dataset).parse_options(options or {})
    return parsed.model_dump(mode="json") if parsed is not None else {}


def classifier_path(
    dataset: str,
    dataset_options: dict[str, Any] | None,
    frames: int,
    height: int,
    width: int,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where the classifier for (dataset + options, clip shape) is cached."""
    options = resolve_dataset_options(dataset, dataset_options)
    key = cache_key(
        {
            "dataset": dataset,
            "options": options,
            "clip": [frames, height, width],
            "version": CLASSIFIER_VERSION,
        }
    )
    name = f"indomain-{safe_name(dataset)}-{frames}x{height}x{width}-{key}.safetensors"
    return cache_root(cache_dir) / EXTRACTORS / name


def save_classifier(path: Path, model: VideoClassifier, meta: dict[str, Any]) -> Path:
    """Write weights + JSON metadata atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    record = {
        **meta,
        "version": CLASSIFIER_VERSION,
        "num_classes": model.num_classes,
        "net_width": model.width,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"eflow": json.dumps(record)})
    return path


def read_classifier_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a classifier file."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["eflow"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise EflowError(f"{path} is not an eflow in-domain classifier ({err}); retrain it") from None


def load_classifier(path: Path) -> tuple[VideoClassifier, dict[str, Any]]:
    """The classifier (eval mode, CPU) and its metadata."""
    meta = read_classifier_meta(path)
    if meta.get("version") != CLASSIFIER_VERSION:
        raise EflowError(
            f"{path} was written by classifier version {meta.get('version')}, this eflow reads "
            f"{CLASSIFIER_VERSION}; retrain it with `eflow eval train-extractor`"
        )
    model = VideoClassifier(int(meta["num_classes"]), int(meta["net_width"]))
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError) as err:
        raise EflowError(f"{path} is corrupt ({err}); retrain it with `eflow eval train-extractor`") from None
    return model.eval().requires_grad_(False), meta
