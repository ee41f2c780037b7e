"""Clip-size curriculum: data stages that change resolution and frame count during a run.

`data.stages` splits the run into stretches [start, end) of the steps (like the token-drop stages,
validated the same way); a stage sets any of frames / height / width, the rest come from the data
section. EFlow's T2V recipe trains at 256p, then 480p:

    [[data.stages]]            # first half at 256p ...
    start = 0.0
    end = 0.5
    height = 256
    width = 448
    [[data.stages]]            # ... then the data section's 480 x 832
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

from eflow.config import DataSection
from eflow.errors import ConfigError, EflowError


class Curriculum:
    """The stage of every step and one dataset per distinct clip shape."""

    def __init__(
        self,
        data: DataSection,
        total_steps: int,
        make_dataset: Callable[[int, int, int], Any],
        base_dataset: Any = None,
    ):
        self.data, self.total_steps = data, total_steps
        self.shapes = [data.stage_shape(i) for i in range(max(len(data.stages), 1))]
        built: dict[tuple[int, int, int], Any] = {}
        if base_dataset is not None:
            built[(data.frames, data.height, data.width)] = base_dataset
        for shape in self.shapes:
            if shape not in built:
                built[shape] = make_dataset(*shape)
        self.datasets = [built[shape] for shape in self.shapes]  # per stage

    def stage_at(self, step: int) -> int:
        return self.data.stage_at(step, self.total_steps)

    def unique_datasets(self) -> list[Any]:
        """Each dataset once (stages with the same shape share one)."""
        seen: dict[int, Any] = {}
        for dataset in self.datasets:
            seen.setdefault(id(dataset), dataset)
        return list(seen.values())


def check_stage_grids(model, autoencoder, data: DataSection) -> None:
    """Every stage's clip (and one-frame image clip when images are mixed in) fits the model's patch."""
    for i in range(max(len(data.stages), 1)):
        frames, height, width = data.stage_shape(i)
        where = f"data.stages[{i}]" if data.stages else "data"
        shapes = [(3, frames, height, width)] + ([(3, 1, height, width)] if data.image_ratio > 0 else [])
        for shape in shapes:
            try:
                latent = tuple(autoencoder.latent_shape(shape))
                model.token_grid((1, *latent))
            except (EflowError, ValueError) as err:
                raise ConfigError(f"{where} ({shape[1]} frames of {height}x{width}): {err}") from None
