"""Clip-size curriculum: schedule stages that change resolution and frame count during a run.

A stage of `schedule.stages` (the stretches [start, end) of the steps that also set the token drop and
the MVA share) may set any of frames / height / width; the rest come from the data section. EFlow's
T2V recipe trains at 256p, then 480p:

    [[schedule.stages]]        # first half at 256p ...
    start = 0.0
    end = 0.5
    height = 256
    width = 448
    [[schedule.stages]]        # ... then the data section's 480 x 832
    start = 0.5
    end = 1.0

Each distinct shape gets its own dataset instance (the factory is called with that shape; scans are
cached, so this is cheap). The model has no learned position embedding: it builds the RoPE table of
each new token grid (T', H', W') when it first sees it, so the same weights train at every stage.
`check_stage_grids` fails before training if a stage's latent grid does not fit the model's patch,
naming the stage. Sampling (`eflow sample`, previews) uses the data section's size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eflow.config import DataSection, ScheduleSection
from eflow.errors import ConfigError, EflowError


class Curriculum:
    """One dataset per distinct clip shape of the stages, and which one each step draws from."""

    def __init__(
        self,
        schedule: ScheduleSection,
        data: DataSection,
        total_steps: int,
        make_dataset: Callable[[int, int, int], Any],
        base_dataset: Any = None,
    ):
        self.schedule, self.total_steps = schedule, total_steps
        self.shapes = list(dict.fromkeys(schedule.shapes(data)))  # distinct, in order of first use
        self.datasets = [  # per shape
            base_dataset
            if base_dataset is not None and shape == (data.frames, data.height, data.width)
            else make_dataset(*shape)
            for shape in self.shapes
        ]
        self.stage_dataset = [self.shapes.index(shape) for shape in schedule.shapes(data)]  # per stage

    def dataset_at(self, step: int) -> int:
        """Index into `datasets` of the dataset that step `step` draws from."""
        return self.stage_dataset[self.schedule.stage_at(step, self.total_steps)[0]]


def check_stage_grids(model, autoencoder, schedule: ScheduleSection, data: DataSection) -> None:
    """Every stage's clip (and one-frame image clip when images are mixed in) fits the model's patch;
    an error names the first stage of the shape (or data, when the size is the data section's)."""
    checked: set[tuple[int, int, int]] = set()
    for i, stage in enumerate(schedule.stages):
        frames, height, width = stage.shape(data)
        if (frames, height, width) in checked:
            continue
        checked.add((frames, height, width))
        where = f"schedule.stages[{i}]" if stage.sets_shape() else "data"
        shapes = [(3, frames, height, width)] + ([(3, 1, height, width)] if data.image_ratio > 0 else [])
        for shape in shapes:
            try:
                latent = tuple(autoencoder.latent_shape(shape))
                model.token_grid((1, *latent))
            except (EflowError, ValueError) as err:
                raise ConfigError(f"{where} ({shape[1]} frames of {height}x{width}): {err}") from None
