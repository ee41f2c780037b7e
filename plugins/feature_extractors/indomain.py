"""Feature extractor `indomain`: the penultimate layer of a small 3D-conv classifier trained on the
dataset's own labels (eflow_core/eval/classifier.py), for FVD where no I3D weights exist.

The classifier is trained by `eflow eval train-extractor --data NAME --frames T --size HxW` and
cached per (dataset + options, clip shape, version); `eflow eval` finds it from the run's dataset and
clip shape (context options) or takes an explicit `path`. Input: uint8 clips [B, 3, T, H, W] of
exactly the shape it was trained on (no resizing), mapped to [-1, 1] by x / 127.5 - 1. Features: the
global mean of the last conv stage, [B, 4w] (128 at the default width). `classify` gives the logits
used by sample class accuracy.

Its FVD is labelled "in-domain FVD": the network, its training data and its feature space are
eflow's own, so the numbers compare runs on the same dataset and nothing else. They are not
comparable with published (I3D, Kinetics-400) FVD numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.api import (
    EflowError,
    classifier_path,
    file_sha256,
    hookimpl,
    load_classifier,
    resolve_dataset_options,
    to_unit_range,
)

METRIC_LABEL = "in-domain FVD"


class IndomainOptions(BaseModel):
    """Options of the `indomain` extractor (`eflow eval` fills the context fields from the run)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="a classifier file; default: the cached one for the dataset and clip shape"
    )
    dataset: str | None = Field(None, description="dataset the classifier was trained on (context)")
    dataset_options: dict[str, Any] | None = Field(None, description="that dataset's options (context)")
    clip_frames: int | None = Field(None, ge=1, description="frames per clip (context)")
    clip_height: int | None = Field(None, ge=1, description="clip height (context)")
    clip_width: int | None = Field(None, ge=1, description="clip width (context)")
    cache_dir: str | None = Field(None, description="cache root (context; default ~/.cache/eflow)")


def train_command(
    dataset: str, options: dict[str, Any], frames: int, height: int, width: int, cache_dir
) -> str:
    """The exact `eflow eval train-extractor` command that creates the missing classifier."""
    defaults = resolve_dataset_options(dataset, {})
    extra = "".join(
        f" --data-option {k}={_toml(v)}" for k, v in sorted(options.items()) if defaults.get(k) != v
    )
    cache = f" --cache-dir {cache_dir}" if cache_dir else ""
    return (
        f"eflow eval train-extractor --data {dataset} --frames {frames} --size {height}x{width}{extra}{cache}"
    )


def _toml(value: Any) -> str:
    """A value as `--data-option` reads it (TOML scalars, lists, strings quoted when needed)."""
    import json

    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return f"'{text}'" if any(c in text for c in " []{}") else text


def _require_labels(dataset: str, options: dict[str, Any], frames: int, height: int, width: int) -> None:
    """Fail clearly when the dataset has no class labels (no classifier can be trained on it)."""
    from eflow.api import get_registry

    data = get_registry("dataset").create(dataset, frames, height, width, seed=0, options=options)
    if not getattr(data, "num_classes", None):
        raise EflowError(
            f"dataset '{dataset}' has no class labels, so there is no in-domain classifier for it; "
            "use --extractor i3d --i3d-path PATH (and leave out --metric accuracy)"
        )


class InDomainExtractor:
    """uint8 clips [B, 3, T, H, W] -> penultimate features [B, 4w]; `classify` -> logits [B, K]."""

    name = "indomain"
    metric_label = METRIC_LABEL

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        dataset_options: dict[str, Any] | None = None,
        clip_frames: int | None = None,
        clip_height: int | None = None,
        clip_width: int | None = None,
        cache_dir: str | None = None,
    ):
        if path is None:
            frames, height, width = clip_frames, clip_height, clip_width
            if dataset is None or None in (frames, height, width):
                raise EflowError(
                    "the indomain extractor needs `path` or the dataset and clip shape (dataset, "
                    "clip_frames, clip_height, clip_width); `eflow eval` fills them from the run"
                )
            options = resolve_dataset_options(dataset, dataset_options)
            file = classifier_path(dataset, options, frames, height, width, cache_dir)
            if not file.is_file():
                _require_labels(dataset, options, frames, height, width)
                raise EflowError(
                    f"no in-domain classifier for dataset '{dataset}' at {frames}x{height}x{width} in "
                    f"{file.parent}; train one with: {train_command(dataset, options, frames, height, width, cache_dir)}"
                )
        else:
            file = Path(path).expanduser()
            if not file.is_file():
                raise EflowError(f"indomain path {file} does not exist")
        self.model, self.meta = load_classifier(file)
        self.path = file
        self.dim = self.model.dim
        self.classes = list(self.meta["classes"])
        self.clip = tuple(self.meta["clip"])  # (T, H, W)
        self.content_hash = file_sha256(file)
        self.device = torch.device("cpu")
        t, h, w = self.clip
        self.protocol = {
            "resolution": f"{h}x{w} (the clips' own; no resize)",
            "frames": t,
            "input": "uint8 [B, 3, T, H, W] in 0..255, mapped to [-1, 1] as x / 127.5 - 1",
            "features": f"pooled penultimate layer of the in-domain 3D-conv classifier ({self.dim})",
            "dataset": self.meta["dataset"],
            "dataset_options": self.meta["dataset_options"],
            "heldout_accuracy": self.meta["heldout"]["accuracy"],
        }

    def to(self, device: torch.device | str) -> InDomainExtractor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def check_clip_shape(self, shape: tuple[int, ...]) -> None:
        """Clips must have exactly the classifier's (3, T, H, W)."""
        if tuple(shape) != (3, *self.clip):
            t, h, w = self.clip
            raise EflowError(
                f"the in-domain classifier {self.path.name} takes 3x{t}x{h}x{w} clips, got "
                f"{'x'.join(map(str, shape))}; train one for this shape with `eflow eval train-extractor`"
            )

    @torch.no_grad()
    def features(self, videos: Tensor) -> Tensor:
        """uint8 [B, 3, T, H, W] -> float [B, dim]."""
        return self.model.features(to_unit_range(videos.to(self.device)))

    @torch.no_grad()
    def classify(self, videos: Tensor) -> Tensor:
        """uint8 [B, 3, T, H, W] -> logits [B, K]."""
        return self.model(to_unit_range(videos.to(self.device)))


@hookimpl
def register_feature_extractors(register):
    register(
        "indomain",
        InDomainExtractor,
        summary="in-domain FVD features: a 3D-conv classifier trained on the dataset's labels (eflow eval train-extractor)",
        options=IndomainOptions,
    )
