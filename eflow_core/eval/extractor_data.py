"""What the in-domain classifier (`eflow eval train-extractor`) trains on: a dataset, its options and
a clip shape, from a run's config and/or explicit choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eflow.config import load_run_config


@dataclass
class ExtractorData:
    """A dataset and clip shape (frames x height x width) to train the in-domain classifier on."""

    name: str = "shapes"
    options: dict[str, Any] = field(default_factory=dict)
    frames: int = 8
    height: int = 32
    width: int = 32


def extractor_data(
    run: str | Path | None = None,
    data: str | None = None,
    options: dict[str, Any] | None = None,
    frames: int | None = None,
    size: tuple[int, int] | None = None,
) -> ExtractorData:
    """The dataset, options and clip of `run`'s config (without a run: shapes at 8x32x32); `data` picks
    another dataset (whose options start empty, unless it is the run's own), `options` are added, and
    `frames` and `size` = (height, width) replace the clip's (None = keep)."""
    base = ExtractorData()
    if run is not None:
        d = load_run_config(run).data
        base = ExtractorData(d.name, dict(d.options), d.frames, d.height, d.width)
    name, opts = base.name, base.options
    if data is not None:
        name, opts = data, {} if data != name else opts
    opts.update(options or {})
    height, width = size if size is not None else (base.height, base.width)
    return ExtractorData(name, opts, frames if frames is not None else base.frames, height, width)
