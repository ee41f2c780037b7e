"""Time samplers and schedules (t = 0 is data, t = 1 is noise; s < t is the cleaner time).

Every random draw takes an optional torch.Generator; draws happen on the generator's device and are then
moved to `device`, so a CPU generator can drive CUDA training reproducibly.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_GAP = 1e-4  # smallest t - s (and t - l) the SCM samplers allow (SoFlow's clamps)


def _device_of(generator: torch.Generator | None, device) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def rand(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """U[0, 1) draws of `shape` (float32)."""
    return torch.rand(shape, generator=generator, device=_device_of(generator, device)).to(device)


def randn(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """N(0, 1) draws of `shape` (float32)."""
    return torch.randn(shape, generator=generator, device=_device_of(generator, device)).to(device)


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise shaped, typed and placed like x."""
    return randn(x.shape, generator, x.device).to(x.dtype)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t <- shift t / (1 + (shift - 1) t) (EFlow Eq. 26): shift > 1 moves mass toward noise (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


def logit_normal(
    n: int, mu: float, sigma: float, shift: float = 1.0, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """[n] times t = shift_time(sigmoid(N(mu, sigma^2)), shift) in (0, 1)."""
    return shift_time(torch.sigmoid(mu + sigma * randn(n, generator, device)), shift)


def sample_scm_times(
    n: int,
    mu_t: float = 0.0,
    sigma_t: float = 1.0,
    shift_t: float = 3.0,
    mu_s: float = -1.0,
    sigma_s: float = 0.8,
    shift_s: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[Tensor, Tensor]:
    """[n] pairs (t, s) with s < t: each from its logit-normal; a pair drawn as s > t is swapped, then
    t >= MIN_GAP and s <= t - MIN_GAP are clamped (SoFlow's clamps; the swap keeps the pair informative
    instead of collapsing it onto s = t - MIN_GAP)."""
    a = logit_normal(n, mu_t, sigma_t, shift_t, generator, device)
    b = logit_normal(n, mu_s, sigma_s, shift_s, generator, device)
    t = torch.maximum(a, b).clamp(min=MIN_GAP)
    s = torch.minimum(a, b).clamp(min=0.0)
    return t, torch.minimum(s, t - MIN_GAP)


def l_ratio(step: int, total_steps: int, r0: float, r1: float) -> float:
    """r(step) = r0 (r1 / r0)^(step / total_steps), SoFlow's exponential l - t schedule (step clamped)."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return r0 * (r1 / r0) ** frac


def intermediate_time(t: Tensor, s: Tensor, step: int, total_steps: int, r0: float, r1: float) -> Tensor:
    """[B] l = t + (s - t) r(step), then clamped to s <= l <= t - MIN_GAP."""
    l = t + (s - t) * l_ratio(step, total_steps, r0, r1)
    return torch.maximum(torch.minimum(l, t - MIN_GAP), s)


def mva_grid(points: int = 64, shift: float = 3.0) -> Tensor:
    """[points] MVA's discrete times: uniform in [0, 1] (ends included) with the shift (EFlow B.2), ascending."""
    return shift_time(torch.linspace(0.0, 1.0, points, dtype=torch.float64), shift).float()


def sample_mva_triplets(
    n: int, grid: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """[n] triplets t > l > s of grid points: three distinct grid indices, uniform over index triples."""
    if len(grid) < 3:
        raise ValueError(f"an MVA grid needs at least 3 points, got {len(grid)}")
    idx = rand((n, len(grid)), generator, grid.device).argsort(dim=1)[:, :3].sort(dim=1).values
    s, l, t = grid[idx[:, 0]], grid[idx[:, 1]], grid[idx[:, 2]]
    return t, l, s


def sampling_schedule(steps: int, shift: float = 3.0) -> Tensor:
    """[steps + 1] inference times 1 = t_N > ... > t_0 = 0: uniform with the shift (EFlow B.3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()
