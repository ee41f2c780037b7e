"""Parameter counts of a model preset (`eflow model info`), built on the meta device: no memory used."""

from __future__ import annotations

import torch

from eflow.registry import get_registry


def preset_parameter_counts(preset: str, attention: str = "glga") -> dict[str, int]:
    """Parameters per part (and total) of `preset` with the `attention` backend (an unknown name of
    either lists the choices)."""
    from eflow.model.dit import build_model

    get_registry("attention").get(attention)
    with torch.device("meta"):
        model = build_model(preset, attention=attention)
    return model.parameter_counts()
