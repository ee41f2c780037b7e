"""Build a run's parts from its RunConfig, each through its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eflow.config import RunConfig
from eflow.data.batches import Conditioner
from eflow.data.curriculum import check_stage_grids
from eflow.errors import EflowError
from eflow.registry import get_registry


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EflowError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EflowError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


@dataclass
class Parts:
    """The pieces a run is made of (all built from the registries)."""

    dataset: Any
    autoencoder: Any
    conditioner: Conditioner
    model: nn.Module
    num_classes: int | None
    latent_shape: tuple[int, int, int, int]  # (c, t, h, w) of one clip's latents

    def move_to(self, device: torch.device) -> None:
        """Move the autoencoder and text encoder (when they are modules) to the run's device."""
        for part in (self.autoencoder, self.conditioner.text_encoder):
            if isinstance(part, nn.Module):
                part.to(device)


def build_dataset(cfg: RunConfig, shape: tuple[int, int, int] | None = None):
    """The run's dataset at clips of `shape` = (frames, height, width) (default: the data section's)."""
    d = cfg.data
    frames, height, width = shape or (d.frames, d.height, d.width)
    return get_registry("dataset").create(
        d.name, frames, height, width, seed=cfg.train.seed, options=d.options
    )


def build_parts(cfg: RunConfig, *, with_dataset: bool = True) -> Parts:
    """Dataset, autoencoder, conditioner and model for `cfg` (model on CPU, float32)."""
    from eflow.model.dit import build_model

    d = cfg.data
    dataset = build_dataset(cfg) if with_dataset else None
    autoencoder = get_registry("autoencoder").create(d.autoencoder, options=d.autoencoder_options)
    text_encoder = None
    num_classes = None
    if d.condition == "text":
        text_encoder = get_registry("text_encoder").create(d.text_encoder, options=d.text_encoder_options)
    elif dataset is not None:
        num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None:
            raise EflowError(f"dataset '{d.name}' has no class labels (num_classes); use --condition text")
        if d.num_classes is not None and d.num_classes != num_classes:
            raise EflowError(
                f"data.num_classes={d.num_classes} but dataset '{d.name}' has {num_classes} classes"
            )
    else:
        num_classes = d.num_classes
        if num_classes is None:
            raise EflowError(
                "the run's config.json has no data.num_classes; was it written by `eflow train`?"
            )
    latent_shape = tuple(autoencoder.latent_shape((3, d.frames, d.height, d.width)))
    check_run = getattr(dataset, "check_run", None)  # pre-encoded data must match the run's encoders
    if callable(check_run):
        check_run(
            d.autoencoder,
            latent_shape,
            d.text_encoder if d.condition == "text" else None,
            text_encoder.dim if text_encoder is not None else None,
        )
    model = build_model(
        cfg.model.preset,
        overrides=cfg.model.overrides,
        attention=cfg.model.attention,
        attention_options=cfg.model.attention_options,
        in_channels=latent_shape[0],
        num_classes=num_classes,
        text_dim=text_encoder.dim if text_encoder is not None else None,
        guidance_embed=cfg.model.guidance_embed,
    )
    model.token_grid((1, *latent_shape))  # fails early, naming the dimension, if the patch does not divide
    check_stage_grids(model, autoencoder, cfg.schedule, d)  # the same for every stage's clip size and images
    return Parts(
        dataset, autoencoder, Conditioner(d.condition, text_encoder), model, num_classes, latent_shape
    )


def resolve_plugin_options(cfg: RunConfig) -> None:
    """Write the objective's, token drop's and sampler's options out in full (defaults included), so the
    run's config.json records every choice (e.g. which stop-gradient target SCM and MVA used)."""
    from eflow.sampling import sampler_name

    for kind, section, name, field in (
        ("objective", cfg.objective, cfg.objective.name, "options"),
        ("token_drop", cfg.token_drop, cfg.token_drop.name, "options"),
        ("sampler", cfg.sample, sampler_name(cfg), "sampler_options"),
    ):
        parsed = get_registry(kind).get(name).parse_options(getattr(section, field))
        if parsed is not None:
            setattr(section, field, parsed.model_dump(mode="json"))


def validate_plugins(cfg: RunConfig) -> None:
    """Check every plugin name and options block of `cfg` against the registries before any work starts."""
    checks = [
        ("attention", cfg.model.attention, cfg.model.attention_options),
        ("objective", cfg.objective.name, cfg.objective.options),
        ("token_drop", cfg.token_drop.name, cfg.token_drop.options),
        ("dataset", cfg.data.name, cfg.data.options),
        ("autoencoder", cfg.data.autoencoder, cfg.data.autoencoder_options),
    ]
    if cfg.data.condition == "text":
        checks.append(("text_encoder", cfg.data.text_encoder, cfg.data.text_encoder_options))
    from eflow.sampling import sampler_name

    checks.append(("sampler", sampler_name(cfg), cfg.sample.sampler_options))
    for kind, name, options in checks:
        get_registry(kind).get(name).parse_options(options)
