"""Time samplers and schedules: ordering, shift, l - t schedule, MVA grid, inference schedule."""

from __future__ import annotations

import pytest
import torch

from eflow.timesteps import (
    MIN_GAP,
    intermediate_time,
    l_ratio,
    logit_normal,
    mva_grid,
    sample_mva_triplets,
    sample_scm_times,
    sampling_schedule,
    shift_time,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shift_keeps_endpoints_and_order_and_shift_one_is_identity():
    t = torch.linspace(0, 1, 101)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted.diff() > 0).all()
    assert (shifted[1:-1] > t[1:-1]).all()  # shift 3 moves every interior time toward noise
    assert torch.equal(shift_time(t, 1.0), t)
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_logit_normal_mean_is_one_half_for_standard_normal_logits():
    t = logit_normal(200_000, 0.0, 1.0, generator=gen())
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert t.min() > 0 and t.max() < 1


def test_logit_normal_shift_three_moves_mass_toward_noise():
    plain = logit_normal(100_000, 0.0, 1.0, 1.0, gen(1))
    shifted = logit_normal(100_000, 0.0, 1.0, 3.0, gen(1))
    assert torch.allclose(shifted, shift_time(plain, 3.0))
    assert shifted.mean() > plain.mean() + 0.15  # ~0.70 vs 0.50


def test_logit_normal_is_reproducible_from_a_seed():
    assert torch.equal(logit_normal(64, 0.0, 1.0, 3.0, gen(5)), logit_normal(64, 0.0, 1.0, 3.0, gen(5)))
    assert not torch.equal(logit_normal(64, 0.0, 1.0, 3.0, gen(5)), logit_normal(64, 0.0, 1.0, 3.0, gen(6)))


def test_scm_pairs_have_s_below_t_with_the_minimum_gap():
    t, s = sample_scm_times(50_000, generator=gen(2))
    assert (t >= MIN_GAP).all() and (s >= 0).all() and (t <= 1).all()
    assert (t - s >= MIN_GAP * 0.999).all()
    # swapping keeps the pairs spread out: few collapse onto the minimum gap
    assert ((t - s) < 1e-3).float().mean() < 0.01
    assert s.mean() < 0.35 < 0.6 < t.mean()


def test_l_schedule_runs_exponentially_from_r0_to_r1():
    assert l_ratio(0, 1000, 0.1, 0.002) == pytest.approx(0.1)
    assert l_ratio(1000, 1000, 0.1, 0.002) == pytest.approx(0.002)
    assert l_ratio(500, 1000, 0.1, 0.002) == pytest.approx((0.1 * 0.002) ** 0.5)  # geometric midpoint
    assert l_ratio(5000, 1000, 0.1, 0.002) == pytest.approx(0.002)  # clamped past the end


def test_intermediate_time_lies_between_s_and_t():
    t, s = sample_scm_times(20_000, generator=gen(3))
    for step in (0, 700, 1000):
        l = intermediate_time(t, s, step, 1000, 0.1, 0.002)
        assert (l >= s).all() and (l <= t - MIN_GAP * 0.999).all()
        assert (s < l).float().mean() > 0.99 and (l < t).all()
    t, s = torch.tensor([0.9]), torch.tensor([0.1])
    assert intermediate_time(t, s, 0, 10, 0.1, 0.002).item() == pytest.approx(0.9 - 0.8 * 0.1)


def test_mva_grid_is_64_shifted_uniform_points_with_both_ends():
    grid = mva_grid(64, 3.0)
    assert grid.shape == (64,) and grid[0] == 0 and grid[-1] == 1
    assert torch.allclose(grid, shift_time(torch.linspace(0, 1, 64, dtype=torch.float64), 3.0).float())
    assert (grid.diff() > 0).all()


def test_mva_triplets_are_strictly_ordered_grid_members():
    grid = mva_grid(64, 3.0)
    t, l, s = sample_mva_triplets(10_000, grid, gen(4))
    for v in (t, l, s):
        assert torch.isin(v, grid).all()
    assert (t > l).all() and (l > s).all()
    assert t.max() == 1 and s.min() == 0  # the whole grid is reachable
    t2, l2, s2 = sample_mva_triplets(10_000, grid, gen(4))
    assert torch.equal(t, t2) and torch.equal(l, l2) and torch.equal(s, s2)


def test_sampling_schedule_runs_from_one_to_zero_monotonically():
    for steps in (1, 2, 4, 8):
        ts = sampling_schedule(steps, 3.0)
        assert len(ts) == steps + 1 and ts[0] == 1 and ts[-1] == 0
        assert (ts.diff() < 0).all()
    assert sampling_schedule(2, 3.0)[1].item() == pytest.approx(0.75)
    assert torch.equal(sampling_schedule(1), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        sampling_schedule(0)
