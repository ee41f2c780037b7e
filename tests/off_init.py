"""Models and tiny training runs moved off their initialization, for tests that compare two computations.

The VideoDiT's AdaLN-Zero modulation and its output head start at zero: at init its output is zero and
most gradients are zero, and the few steps of a tiny run (lr 1e-3) leave the blocks' share of the output
tiny, so a comparison of outputs, losses or sampled videos would hold whatever the blocks computed: in
a tiny 2-step run, halving every attention output left the sampled frames' pixels bit-identical; in a
4-step run, scaling it by 0.8 moved the losses by 2e-7 relative."""

from __future__ import annotations

from pathlib import Path

import torch

SCALE = 0.05  # as tests/test_parallel.py: larger moves make activations (and fp32 rounding) large


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = SCALE) -> torch.nn.Module:
    """Add scale * N(0, 1) to every parameter, drawn from a generator of its own (the global RNG stream,
    which a run's draws come from, is left as it was)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return model


def start_runs_off_init(monkeypatch=None) -> None:
    """Trainer runs started in this process afterwards build their model perturbed (the same on every
    rank); a resumed run then loads its checkpoint over it. With pytest's `monkeypatch`, undone after
    the test; without, for a torchrun worker process."""
    from eflow.train import trainer as trainer_mod

    build = trainer_mod.build_parts

    def build_off_init(cfg, *args, **kwargs):
        parts = build(cfg, *args, **kwargs)
        perturb(parts.model)
        return parts

    if monkeypatch is None:
        trainer_mod.build_parts = build_off_init
    else:
        monkeypatch.setattr(trainer_mod, "build_parts", build_off_init)


def mean_output(run_dir: Path, weights: str = "ema") -> float:
    """Mean |F| of a run's model on a random clip: ~0.02 for a tiny 2-step run from init, ~0.4 off init."""
    from eflow.condition import Condition
    from eflow.loaded_run import load_run

    parts = load_run(run_dir, torch.device("cpu"), weights).parts
    x = torch.randn(2, *parts.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        out = parts.model(x, t, t, Condition(labels=torch.tensor([0, 1])), torch.tensor([4.0, 4.0]))
    return out.abs().mean().item()
