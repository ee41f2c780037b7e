"""Samplers: NFE accounting, CFG batching, Algorithm 2's single jump and fresh re-noising."""

from __future__ import annotations

import itertools

import pytest
import torch
from toy_model import ToyModel

from eflow.condition import NULL_LABEL, Condition
from eflow.errors import ConfigError
from eflow.network import Network
from eflow.plugins.samplers import euler, solution
from eflow.registry import Registry
from eflow.timesteps import sampling_schedule

B = 6


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyModel(hidden=32, record=True).eval()


@pytest.fixture
def noise():
    return torch.randn(B, 2, 1, 1, 1, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def cond():
    return Condition(labels=torch.arange(B) % 4)


def registry() -> Registry:
    reg = Registry("sampler")
    euler.register_samplers(reg.register)
    solution.register_samplers(reg.register)
    return reg


def test_samplers_are_registered_with_their_options():
    reg = registry()
    assert reg.names() == ["euler", "solution"]
    assert reg.create("euler").shift == 3.0
    assert reg.create("solution", options={"shift": 2.0}).shift == 2.0
    with pytest.raises(ConfigError, match="steps: unknown field"):
        reg.create("solution", options={"steps": 4})


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_euler_costs_two_nfe_per_step_with_guidance_in_one_batched_call(model, noise, cond, steps):
    sampler = euler.EulerSampler()
    sampler.sample(model, noise, cond, steps, guidance=4.0)
    assert sampler.last_nfe == 2 * steps
    assert len(model.calls) == steps and all(c["n"] == 2 * B for c in model.calls)
    labels = model.calls[0]["labels"]
    assert torch.equal(labels[:B], cond.labels) and (labels[B:] == NULL_LABEL).all()
    assert all((c["guidance"] == 0).all() for c in model.calls)  # fm has no guidance input


@pytest.mark.parametrize("guidance", [1.0, None])
def test_euler_without_guidance_costs_one_nfe_per_step(model, noise, cond, guidance):
    sampler = euler.EulerSampler()
    sampler.sample(model, noise, cond, 5, guidance=guidance)
    assert sampler.last_nfe == 5 and all(c["n"] == B for c in model.calls)
    assert all(torch.equal(c["labels"], cond.labels) for c in model.calls)


def test_euler_cfg_combines_velocities_as_vu_plus_w_times_difference(noise, cond):
    def const(x, t, s, c, g, path="full", keep=None):  # v = 1 for the class, 3 for null
        return torch.where((c.labels == NULL_LABEL).view(-1, 1, 1, 1, 1), 3.0, 1.0).expand_as(x).clone()

    sampler = euler.EulerSampler()
    x = sampler.sample(const, noise, cond, 4, guidance=2.5)
    # x_0 = x_1 - v with v = 3 + 2.5 (1 - 3) = -2
    assert torch.allclose(x, noise + 2.0, atol=1e-6)


def test_euler_steps_follow_the_shifted_schedule(model, noise, cond):
    euler.EulerSampler(shift=3.0).sample(model, noise, cond, 4, guidance=1.0)
    seen = torch.stack([c["t"][0] for c in model.calls])
    assert torch.allclose(seen, sampling_schedule(4, 3.0)[:-1])
    assert all(torch.equal(c["t"], c["s"]) for c in model.calls)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_solution_sampler_costs_one_nfe_per_step(model, noise, cond, steps):
    sampler = solution.SolutionSampler()
    sampler.sample(model, noise, cond, steps, guidance=4.0, generator=torch.Generator().manual_seed(0))
    assert sampler.last_nfe == steps and len(model.calls) == steps
    for c, t in zip(model.calls, sampling_schedule(steps, 3.0)[:-1], strict=True):
        assert torch.allclose(c["t"], t.expand(B)) and (c["s"] == 0).all()
        assert (c["guidance"] == 4.0).all() and c["n"] == B


def test_solution_sampler_with_one_step_is_a_single_jump_from_noise_to_data(model, noise, cond):
    x = solution.SolutionSampler().sample(model, noise, cond, 1, guidance=3.0)
    with torch.no_grad():
        expected = Network(model).solution(noise, torch.ones(B), torch.zeros(B), cond, torch.full((B,), 3.0))
    assert torch.equal(x, expected)


def test_solution_sampler_renoises_with_fresh_noise_from_the_generator(model, noise, cond):
    sampler = solution.SolutionSampler()
    a = sampler.sample(model, noise, cond, 3, 4.0, generator=torch.Generator().manual_seed(10))
    b = sampler.sample(model, noise, cond, 3, 4.0, generator=torch.Generator().manual_seed(10))
    c = sampler.sample(model, noise, cond, 3, 4.0, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_solution_sampler_renoising_follows_algorithm_2(noise, cond):
    """With F = x / t (so f(x, t, 0) = 0), the state fed to step n is exactly t_n z_n for fresh z_n."""
    seen = []

    def model(x, t, s, c, g, path="full", keep=None):
        seen.append(x.clone())
        return x / t.view(-1, 1, 1, 1, 1)

    gen = torch.Generator().manual_seed(3)
    out = solution.SolutionSampler().sample(model, noise, cond, 3, 4.0, generator=gen)
    ref = torch.Generator().manual_seed(3)
    ts = sampling_schedule(3, 3.0)
    assert torch.equal(seen[0], noise)
    for n in (1, 2):
        z = torch.randn(noise.shape, generator=ref)
        assert torch.allclose(seen[n], ts[n] * z)
    assert torch.equal(out, torch.zeros_like(out))


def test_solution_sampler_without_renoising_jumps_along_the_map_between_grid_times(noise, cond):
    """renoise=false: each step is f(x, t_n, t_{n-1}) = x + (t_{n-1} - t_n) F(x, t_n, t_{n-1}), no noise
    drawn. With F = x / t, f(x, t, s) = (s / t) x, so the state at step n is (t_n / 1) noise exactly."""
    seen, pairs = [], []

    def model(x, t, s, c, g, path="full", keep=None):
        seen.append(x.clone())
        pairs.append((float(t[0]), float(s[0])))
        return x / t.view(-1, 1, 1, 1, 1)

    sampler = solution.SolutionSampler(renoise=False)
    a = sampler.sample(model, noise, cond, 3, 4.0, generator=torch.Generator().manual_seed(3))
    ts = sampling_schedule(3, 3.0).tolist()
    assert pairs == [(pytest.approx(ts[n]), pytest.approx(ts[n + 1])) for n in range(3)]
    for n in range(3):
        assert torch.allclose(seen[n], ts[n] * noise)
    assert torch.allclose(a, torch.zeros_like(a), atol=1e-6) and sampler.last_nfe == 3
    b = sampler.sample(model, noise, cond, 3, 4.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)  # deterministic: the generator is not used


def test_with_one_step_both_solution_modes_are_the_same_jump(model, noise, cond):
    one = solution.SolutionSampler(renoise=False).sample(model, noise, cond, 1, guidance=3.0)
    assert torch.equal(one, solution.SolutionSampler().sample(model, noise, cond, 1, guidance=3.0))


def test_a_grid_sampler_implements_one_step_and_the_base_walks_the_grid(noise, cond):
    """A plugin's GridSampler: its step sees every pair of grid times in order, `last_nfe` counts
    nfe_per_step per step and the callback follows every step; its ShiftOptions take only `shift`."""
    from eflow.api import GridSampler, ShiftOptions, shift_field

    class HalfOptions(ShiftOptions):
        shift: float = shift_field("the grid's shift")

    class Halving(GridSampler):
        nfe_per_step = 2

        def stepper(self, model, noise, cond, guidance, generator):
            def step(x, t, t_now, t_next):
                seen.append((t_now, t_next, t.dtype, tuple(t.shape)))
                return x / 2

            return step

    seen, reports = [], []
    reg = Registry("sampler")
    reg.register("halving", Halving, options=HalfOptions)
    sampler = reg.create("halving", options={"shift": 2.0})
    assert HalfOptions.model_fields["shift"].description == "the grid's shift"
    with pytest.raises(ConfigError, match="steps: unknown field; valid fields: shift"):
        reg.create("halving", options={"steps": 4})
    out = sampler.sample(None, noise, cond, 3, callback=lambda i, n, x: reports.append((i, n, x.clone())))
    ts = sampling_schedule(3, 2.0).tolist()
    assert [(a, b) for a, b, _, _ in seen] == list(itertools.pairwise(ts))
    assert all(dtype == torch.float32 and shape == (B,) for _, _, dtype, shape in seen)
    assert sampler.last_nfe == 6 and torch.equal(out, noise / 8)
    assert [(i, n) for i, n, _ in reports] == [(0, 3), (1, 3), (2, 3)]
    assert torch.equal(reports[-1][2], out)
