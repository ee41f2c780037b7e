"""Every registered plugin of every kind honours its contract (third-party ones too, once installed)."""

import copy

import pytest
import torch

from eflow.condition import Condition
from eflow.model.dit import build_model
from eflow.network import DropPlan, Network
from eflow.objective import ForwardCost, StepInfo
from eflow.registry import get_registry

SHAPE = (4, 3, 2, 16, 16)  # [B, C, T, H, W]; tiny's 1x4x4 patch -> grid (2, 4, 4), 32 tokens


def names(kind):
    return get_registry(kind).names()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", num_classes=10)
    with torch.no_grad():  # leave AdaLN-Zero's exact zero output so every pass does real work
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.mark.parametrize("name", names("token_drop"))
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_token_drop_returns_sorted_unique_indices_of_one_count(name, ratio):
    drop = get_registry("token_drop").create(name)
    grid, n = (4, 6, 6), 144
    index = drop.select(grid, 3, ratio, torch.Generator().manual_seed(0))
    assert index.dtype == torch.long and index.shape[0] == 3
    assert 0 < index.shape[1] <= n and int(index.min()) >= 0 and int(index.max()) < n
    for row in index:
        assert torch.equal(row, row.unique())  # sorted, no repeats


@pytest.mark.parametrize("name", names("objective"))
def test_objective_gives_a_finite_loss_that_backpropagates_and_declares_its_cost(name, model):
    objective = get_registry("objective").create(name, total_steps=10)
    m = copy.deepcopy(model).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(1)
    x0 = torch.rand(SHAPE) * 2 - 1
    cond = Condition(labels=torch.tensor([0, 1, 2, 3]))
    drop = DropPlan(get_registry("token_drop").create("sprint"), 0.5, torch.Generator().manual_seed(0))
    net = Network(m, ema, drop)
    out = objective.loss(net, {"x0": x0, "cond": cond}, StepInfo(step=9, total_steps=10, mva_share=0.25))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(isinstance(v, (int, float)) for v in out.metrics.values())
    assert isinstance(objective.cost(), ForwardCost)
    assert sum(net.counts.values()) > 0


@pytest.mark.parametrize("name", names("sampler"))
@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_turns_noise_into_finite_latents_of_the_same_shape(name, steps, model):
    sampler = get_registry("sampler").create(name)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond = Condition(labels=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        out = sampler.sample(
            model.eval(), noise, cond, steps, 4.0, generator=torch.Generator().manual_seed(1)
        )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert not torch.equal(out, noise)


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_items_are_clips_in_range_with_a_condition(name):
    dataset = get_registry("dataset").create(name, 3, 8, 12, seed=0)
    item = dataset[0]
    assert item["video"].shape == (3, 3, 8, 12)
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert "label" in item or "caption" in item


@pytest.mark.parametrize("name", names("autoencoder"))
def test_autoencoder_latents_have_the_declared_shape_and_decode_back(name):
    ae = get_registry("autoencoder").create(name)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    latents = ae.encode(video)
    assert tuple(latents.shape[1:]) == tuple(ae.latent_shape((3, 4, 16, 16)))
    assert ae.decode(latents).shape == video.shape


@pytest.mark.parametrize("name", names("text_encoder"))
def test_text_encoder_gives_padded_embeddings_and_a_mask(name):
    encoder = get_registry("text_encoder").create(name)
    emb, mask = encoder.encode(["a red square moving left", ""])
    assert emb.shape[:2] == mask.shape and emb.shape[2] == encoder.dim
    assert mask[0].any() and mask.dtype == torch.bool
