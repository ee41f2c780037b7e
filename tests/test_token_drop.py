"""Token-drop strategies: sorted unique in-range indices, exact counts, SPRINT group coverage, seeding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eflow.errors import ConfigError
from eflow.registry import get_registry

STRATEGIES = ["none", "random", "sprint"]
RATIOS = [0.0, 0.5, 0.75]
GRIDS = [(8, 8, 8), (1, 8, 8), (3, 5, 7)]
BATCH = 4


def select(name, grid, ratio, seed=0, **options):
    strategy = get_registry("token_drop").create(name, options=options or None)
    return strategy.select(grid, BATCH, ratio, torch.Generator().manual_seed(seed))


def sprint_groups(grid, group=(2, 2, 2)):
    """Raster indices of each group (test oracle: plain python loops)."""
    g = [min(a, b) for a, b in zip(group, grid, strict=True)]
    t_, h_, w_ = grid
    groups = {}
    for t, h, w in itertools.product(range(t_), range(h_), range(w_)):
        groups.setdefault((t // g[0], h // g[1], w // g[2]), []).append((t * h_ + h) * w_ + w)
    return list(groups.values())


def expected_count(name, grid, ratio):
    n = math.prod(grid)
    if name == "none":
        return n
    if name == "random":
        return n - math.floor(ratio * n)
    return sum(max(1, math.floor(len(m) * (1 - ratio) + 0.5)) for m in sprint_groups(grid))


def test_registered_names():
    assert {"none", "random", "sprint"} <= set(get_registry("token_drop").names())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_indices_are_sorted_unique_in_range_with_the_expected_count(name, ratio, grid):
    idx = select(name, grid, ratio)
    n = math.prod(grid)
    assert idx.dtype == torch.long and idx.shape == (BATCH, expected_count(name, grid, ratio))
    assert (idx[:, 1:] > idx[:, :-1]).all()  # strictly increasing: sorted and unique
    assert idx.min() >= 0 and idx.max() < n


def test_paper_counts():
    assert select("sprint", (8, 8, 8), 0.75).shape[1] == 128  # 2 of every 2x2x2 group
    assert select("sprint", (1, 8, 8), 0.75).shape[1] == 16  # images: 1 of every 2x2 group
    assert select("random", (8, 8, 8), 0.75).shape[1] == 128


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_sprint_keeps_k_members_of_every_group(ratio, grid):
    idx = select("sprint", grid, ratio)
    for row in idx.tolist():
        kept = set(row)
        for members in sprint_groups(grid):
            k = max(1, math.floor(len(members) * (1 - ratio) + 0.5))
            assert len(kept.intersection(members)) == k


def test_sprint_group_option():
    idx = select("sprint", (4, 8, 8), 0.75, group=(1, 2, 2))
    assert idx.shape[1] == 64  # 1 of every 1x2x2 group
    with pytest.raises(ConfigError, match="group"):
        get_registry("token_drop").create("sprint", options={"groups": (2, 2, 2)})


@pytest.mark.parametrize("name", ["random", "sprint"])
def test_seeds_decide_the_selection(name):
    a, b, c = (select(name, (4, 8, 8), 0.75, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not all(torch.equal(a[0], row) for row in a[1:])  # samples in a batch differ


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", STRATEGIES)
def test_ratio_outside_zero_one_is_rejected(name, ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        select(name, (2, 4, 4), ratio)
