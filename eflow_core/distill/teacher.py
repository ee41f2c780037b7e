"""The teacher of a distillation: a trained flow-matching run, loaded frozen, and the checks that refuse a
teacher the student cannot learn from (each error names the config field that differs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eflow.condition import Condition
from eflow.config import RunConfig, load_run_config
from eflow.errors import ConfigError

VELOCITY_SAMPLER = "euler"  # the sampler of objectives whose F(x, t, t) is the probability-flow velocity

# Fields the student shares with its teacher, with why: the student starts from the teacher's weights and
# learns the teacher's ODE on the same latents and conditions.
SHARED_FIELDS = (
    ("data.condition", "the teacher's and the student's conditions must be of one kind (label or text)"),
    ("data.num_classes", "the class embedding is the teacher's"),
    ("data.text_encoder", "the text embeddings must be the teacher's"),
    ("data.autoencoder", "the latent space (and its channels) must be the teacher's"),
    ("data.frames", "the latent shape must be the teacher's"),
    ("data.height", "the latent shape must be the teacher's"),
    ("data.width", "the latent shape must be the teacher's"),
    ("model.preset", "the student starts from the teacher's weights"),
    ("model.overrides", "the student starts from the teacher's weights"),
    ("model.guidance_embed", "the student starts from the teacher's weights"),
)


def field_value(cfg: RunConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def trained_sampler(cfg: RunConfig) -> str:
    """The sampler a run's objective was trained for (its default), whatever sample.sampler says."""
    from eflow.sampling import sampler_name

    return sampler_name(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"sampler": None})}))


TEACHER_FLAGS = "--objective fm --attn softmax --token-drop none"  # what a teacher is trained with


def check_velocity_teacher(cfg: RunConfig, where: str = "teacher") -> None:
    """Refuse a teacher whose network is not a velocity field (an SFM run, a distilled student)."""
    sampler = trained_sampler(cfg)
    if sampler != VELOCITY_SAMPLER:
        raise ConfigError(
            f"{where}: objective.name = {cfg.objective.name!r} (sampled with {sampler!r}) is not a velocity "
            "teacher; distillation follows the teacher's probability-flow ODE, so it needs a run whose "
            f"F(x, t, t) is the velocity (objective 'fm', sampled with {VELOCITY_SAMPLER!r})"
        )


def check_compatible(teacher: RunConfig, student: RunConfig, where: str = "teacher") -> None:
    """Refuse a teacher that is not a velocity model or differs from the student in SHARED_FIELDS."""
    check_velocity_teacher(teacher, where)
    text = teacher.data.condition == "text" or student.data.condition == "text"
    unused = "data.num_classes" if text else "data.text_encoder"  # the other kind's field
    for dotted, why in SHARED_FIELDS:
        if dotted == unused:
            continue
        a, b = field_value(teacher, dotted), field_value(student, dotted)
        if a != b:
            raise ConfigError(f"{where}: {dotted} is {a!r} for the teacher but {b!r} for the student; {why}")


@torch.no_grad()
def guided_velocity(model: nn.Module, x_t: Tensor, t: Tensor, cond: Condition, w: Tensor | None) -> Tensor:
    """A velocity model's sampler velocity at (x_t, t) [B]: v_u + w (v_c - v_u) with w [B], classifier-free
    guidance outside the network as the `euler` sampler does (cond and null in one call); w = None: the
    conditional v_c alone. The network's guidance input is 0, as in `fm` training."""
    zeros = torch.zeros_like(t)
    if w is None:
        return model(x_t, t, t, cond, zeros, path="full")
    both = Condition.cat([cond, cond.null()])
    v_c, v_u = model(
        torch.cat([x_t, x_t]), t.repeat(2), t.repeat(2), both, zeros.repeat(2), path="full"
    ).chunk(2)
    return v_u + w.view(-1, *([1] * (x_t.dim() - 1))).to(v_c.dtype) * (v_c - v_u)


@dataclass
class Teacher:
    """A frozen teacher: its run directory, config and model (eval mode, no gradients) on a device."""

    run_dir: Path
    cfg: RunConfig
    model: nn.Module
    step: int
    parts: Any = None  # the run's eflow.assembly.Parts (autoencoder, conditioner) when asked for

    def velocity(self, x_t: Tensor, t: Tensor, cond: Condition, w: Tensor | None) -> Tensor:
        """guided_velocity of the teacher's model."""
        return guided_velocity(self.model, x_t, t, cond, w)

    def check_batch(self, x0: Tensor, cond: Condition, where: str = "teacher") -> None:
        """Refuse a student batch the teacher cannot read: other latent channels or condition kind."""
        channels = self.model.spec.in_channels
        if x0.shape[1] != channels:
            raise ConfigError(
                f"{where}: the teacher's latents have {channels} channels (data.autoencoder = "
                f"{self.cfg.data.autoencoder!r}) but the student's batch has {x0.shape[1]}; use the teacher's "
                "data.autoencoder"
            )
        kind = "text" if cond.text is not None else "label"
        if kind != self.cfg.data.condition:
            raise ConfigError(
                f"{where}: data.condition is {self.cfg.data.condition!r} for the teacher but the student's "
                f"batches carry {kind} conditions"
            )
        self.model.token_grid(x0.shape)  # a shape the teacher's patch does not divide fails, naming it


def load_teacher(
    run_dir: str | Path, device: torch.device, weights: str = "ema", *, keep_parts: bool = False
) -> Teacher:
    """The teacher run's model (EMA weights by default) on `device`, frozen; refuses non-velocity runs.
    keep_parts: also keep its autoencoder and conditioner (to encode calibration clips)."""
    from eflow.loaded_run import load_run

    run_dir = Path(run_dir)
    check_velocity_teacher(load_run_config(run_dir, train_flags=TEACHER_FLAGS), f"teacher {run_dir}")
    run = load_run(run_dir, device, weights)
    model = run.parts.model.requires_grad_(False).eval()
    return Teacher(run_dir, run.cfg, model, run.step, run.parts if keep_parts else None)
