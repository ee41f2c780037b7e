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


# ----- keyed draws (eflow.network.DropPlan): world-size invariance ------------------------------------


def plan(name="sprint", ratio=0.75, seed=7, local_batch=None, batch_start=0):
    from eflow.network import DropPlan

    strategy = get_registry("token_drop").create(name)
    return DropPlan(strategy, ratio, seed=seed, local_batch=local_batch, batch_start=batch_start)


@pytest.mark.parametrize("name", ["random", "sprint"])
@pytest.mark.parametrize("grid", [(4, 6, 6), (1, 2, 2)])  # 1 and 8 rows per draw (rows_per_draw)
def test_a_samples_kept_tokens_depend_on_its_global_row_and_pass_not_on_its_call(name, grid):
    """Rank 1 of 2 holding rows 4-7, or a call mixing two passes, keeps for each sample what one
    process holding all 8 rows keeps for it."""
    p = plan(name)
    whole = p.keep(grid, torch.arange(8), torch.full((8,), 5), (0, 8))
    rank1 = plan(name, local_batch=4, batch_start=4).keep(
        grid, torch.arange(4, 8), torch.full((4,), 5), (4, 8)
    )
    assert torch.equal(rank1, whole[4:])
    mixed = p.keep(grid, torch.tensor([6, 1, 3]), torch.tensor([5, 2, 5]), (0, 8))  # passes 5 and 2, one call
    assert torch.equal(mixed[[0, 2]], whole[[6, 3]])
    assert torch.equal(mixed[1], p.keep(grid, torch.tensor([1]), torch.tensor([2]), (1, 2))[0])
    if math.prod(grid) > 4:  # a 2x2 grid at 75% keeps 1 of 4: draws may coincide
        assert not torch.equal(mixed[1], whole[1])  # another pass draws afresh
        assert not torch.equal(
            plan(name, seed=8).keep(grid, torch.arange(8), torch.full((8,), 5), (0, 8)), whole
        )


def test_rows_per_draw_depends_on_the_token_grid_only():
    from eflow.network import rows_per_draw

    assert [rows_per_draw(g) for g in [(8, 8, 8), (21, 30, 52), (1, 2, 2)]] == [8, 1, 1024]


def test_network_keys_need_each_other():
    from eflow.network import Network

    net = Network(torch.nn.Identity(), drop=plan())
    x = torch.zeros(2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match="needs its `pass_id`"):
        net._keep(x, "full", torch.arange(2), None)
    with pytest.raises(ValueError, match="needs `rows`"):
        net._keep(x, "full", None, 3)


def test_a_call_without_keys_is_its_rows_in_batch_order_from_batch_start():
    """FM calls the network once on its local batch, without keys: rank 1's call keeps for its rows what
    one process's call keeps for the same global rows."""
    from eflow.condition import Condition
    from eflow.model.dit import build_model
    from eflow.network import Network

    kept = []

    class Recorder(torch.nn.Module):  # the model's interface, recording the kept tokens it is given
        def __init__(self):
            super().__init__()
            self.model = build_model("tiny", num_classes=4)

        def token_grid(self, shape):
            return self.model.token_grid(shape)

        def forward(self, x, t, s, cond, guidance, path, keep):
            kept.append(keep)
            return x

    def call(batch_start, rows):
        net = Network(Recorder(), drop=plan(local_batch=rows, batch_start=batch_start))
        x = torch.zeros(rows, 3, 4, 8, 8)
        net(x, torch.ones(rows), torch.ones(rows), Condition(labels=torch.zeros(rows, dtype=torch.long)))
        return kept[-1]

    assert torch.equal(call(2, 2), call(0, 4)[2:])


def objective_names():
    return get_registry("objective").names()


@pytest.mark.parametrize("objective", objective_names())
def test_every_objective_drops_the_same_tokens_on_one_two_and_four_ranks(objective):
    """Each objective's loss with SPRINT dropping, computed as 1, 2 or 4 ranks would (each its rows of the
    global batch, the mean over ranks), is the same in float64; another drop seed changes it."""
    import copy

    from eflow.api import StepInfo
    from eflow.condition import Condition
    from eflow.model.dit import build_model
    from eflow.network import DropPlan, Network

    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from AdaLN-Zero's start, so the middle stack matters
    ema, batch = copy.deepcopy(model), 8
    x0 = torch.randn(batch, 3, 4, 8, 8, dtype=torch.double)
    labels = torch.arange(batch) % 4
    sprint = get_registry("token_drop").create("sprint")

    def loss(world: int, seed: int = 5) -> float:
        total, n = 0.0, batch // world
        for rank in range(world):
            obj = get_registry("objective").create(objective, total_steps=100)
            drop = DropPlan(sprint, 0.5, seed=seed, local_batch=n, batch_start=rank * n)
            info = StepInfo(
                step=50, total_steps=100, mva_share=0.25, batch_start=rank * n, global_batch=batch
            )
            torch.manual_seed(123)  # the trainer seeds every rank alike
            rows = slice(rank * n, rank * n + n)
            out = obj.loss(
                Network(model, ema, drop), {"x0": x0[rows], "cond": Condition(labels=labels[rows])}, info
            )
            total += out.loss.item() / world
        return total

    one = loss(1)
    assert loss(2) == pytest.approx(one, rel=1e-12) and loss(4) == pytest.approx(one, rel=1e-12)
    assert loss(1, seed=6) != pytest.approx(one, rel=1e-6)
