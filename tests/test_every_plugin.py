"""Every registered plugin of every kind honours its contract (third-party ones too, once installed)."""

import copy
import math

import pytest
import torch

from eflow.api import conforms
from eflow.condition import Condition
from eflow.errors import EflowError
from eflow.model.dit import build_model
from eflow.network import DropPlan, Network
from eflow.objective import ForwardCost, StepInfo, to_floats
from eflow.registry import get_registry

SHAPE = (4, 3, 2, 16, 16)  # [B, C, T, H, W]; tiny's 1x4x4 patch -> grid (2, 4, 4), 32 tokens


def names(kind):
    return get_registry(kind).names()


@pytest.fixture(scope="module")
def plugin_options(media, tmp_path_factory):
    """options(kind, name) -> the options a built-in plugin needs to be created here (local files it reads:
    test media, a tiny random Wan VAE or T5, encoded latents); {} for plugins that need none. A
    third-party plugin that needs a local path is skipped with its own error as the reason."""
    made = {}

    def wan():
        diffusers = pytest.importorskip("diffusers")
        from test_wan_vae import TINY

        folder = tmp_path_factory.mktemp("wan")
        diffusers.AutoencoderKLWan(**TINY).save_pretrained(str(folder / "vae"))
        return {"path": str(folder)}

    def t5():
        pytest.importorskip("transformers")
        from test_text_encoders import write_tiny_t5

        folder = tmp_path_factory.mktemp("t5")
        write_tiny_t5(folder)
        return {"path": str(folder)}

    def latents():
        from typer.testing import CliRunner

        from eflow.cli.app import app

        out = tmp_path_factory.mktemp("latents") / "shards"
        args = ["data", "encode", "--data", "shapes", "--frames", "3", "--size", "8x12", "--limit", "6"]
        result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return {"root": str(out)}

    builders = {
        ("dataset", "video-folder"): lambda: {"root": str(media / "good")},
        ("dataset", "captions"): lambda: {"root": str(media / "captions" / "clips.jsonl")},
        ("dataset", "latents"): latents,
        ("autoencoder", "wan"): wan,
        ("text_encoder", "t5"): t5,
    }

    def options(kind, name):
        if (kind, name) in builders and (kind, name) not in made:
            made[kind, name] = builders[kind, name]()
        return made.get((kind, name), {})

    return options


def create(kind, name, options, *args, **kwargs):
    """The plugin, or a skip naming why when a third-party plugin needs files this test cannot provide."""
    try:
        return get_registry(kind).create(name, *args, options=options, **kwargs)
    except EflowError as err:
        built_in = getattr(get_registry(kind).get(name).factory, "__module__", "").startswith("eflow.")
        if built_in or options:
            raise
        pytest.skip(f"{kind} '{name}' needs configuration: {err}")


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
    assert conforms("token_drop", drop), "does not fulfil the token_drop contract of eflow.api"
    grid, n = (4, 6, 6), 144
    index = drop.select(grid, 3, ratio, torch.Generator().manual_seed(0))
    assert index.dtype == torch.long and index.shape[0] == 3
    assert 0 < index.shape[1] <= n and int(index.min()) >= 0 and int(index.max()) < n
    for row in index:
        assert torch.equal(row, row.unique())  # sorted, no repeats


@pytest.mark.parametrize("name", names("objective"))
def test_objective_gives_a_finite_loss_that_backpropagates_and_declares_its_cost(name, model):
    objective = get_registry("objective").create(name, total_steps=10)
    assert conforms("objective", objective), "does not fulfil the objective contract of eflow.api"
    m = copy.deepcopy(model).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(1)
    x0 = torch.rand(SHAPE) * 2 - 1
    cond = Condition(labels=torch.tensor([0, 1, 2, 3]))
    drop = DropPlan(get_registry("token_drop").create("sprint"), 0.5, seed=0)
    net = Network(m, ema, drop)
    out = objective.loss(net, {"x0": x0, "cond": cond}, StepInfo(step=9, total_steps=10, mva_share=0.25))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    tensors = [v for v in out.metrics.values() if isinstance(v, torch.Tensor)]
    assert all(isinstance(v, (int, float)) for v in out.metrics.values() if not isinstance(v, torch.Tensor))
    assert all(v.numel() == 1 and not v.requires_grad for v in tensors)  # logged values, not graph nodes
    assert all(math.isfinite(v) for v in to_floats(out.metrics).values())
    assert isinstance(objective.cost(), ForwardCost)
    assert sum(net.counts.values()) > 0


@pytest.mark.parametrize("name", names("sampler"))
@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_turns_noise_into_finite_latents_of_the_same_shape(name, steps, model):
    sampler = get_registry("sampler").create(name)
    assert conforms("sampler", sampler), "does not fulfil the sampler contract of eflow.api"
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond = Condition(labels=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        out = sampler.sample(
            model.eval(), noise, cond, steps, 4.0, generator=torch.Generator().manual_seed(1)
        )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert not torch.equal(out, noise)


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_items_are_clips_in_range_with_a_condition(name, plugin_options):
    dataset = create("dataset", name, plugin_options("dataset", name), 3, 8, 12, seed=0)
    assert conforms("dataset", dataset), "does not fulfil the dataset contract of eflow.api"
    item = dataset[0]
    if "latents" in item:  # pre-encoded clips (here by the pixel autoencoder: the same shape)
        assert item["latents"].shape == (3, 3, 8, 12) and torch.isfinite(item["latents"]).all()
    else:
        assert item["video"].shape[0] == 3 and item["video"].shape[2:] == (8, 12)
        assert item["video"].shape[1] in (1, 3)  # a clip, or an image as a one-frame clip
        assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert "label" in item or "caption" in item or "text" in item


@pytest.mark.parametrize("name", names("autoencoder"))
def test_autoencoder_latents_have_the_declared_shape_and_decode_back(name, plugin_options):
    ae = create("autoencoder", name, plugin_options("autoencoder", name))
    assert conforms("autoencoder", ae), "does not fulfil the autoencoder contract of eflow.api"
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # 5 = 4k + 1 frames, what causal video VAEs take
    latents = ae.encode(video)
    assert tuple(latents.shape[1:]) == tuple(ae.latent_shape((3, 5, 16, 16)))
    assert ae.decode(latents).shape == video.shape


@pytest.mark.parametrize("name", names("text_encoder"))
def test_text_encoder_gives_padded_embeddings_and_a_mask(name, plugin_options):
    encoder = create("text_encoder", name, plugin_options("text_encoder", name))
    assert conforms("text_encoder", encoder), "does not fulfil the text_encoder contract of eflow.api"
    emb, mask = encoder.encode(["a red square moving left", ""])
    assert emb.shape[:2] == mask.shape and emb.shape[2] == encoder.dim
    assert mask[0].any() and mask.dtype == torch.bool


@pytest.mark.parametrize("name", names("attention"))
def test_attention_backend_fulfils_the_contract_and_keeps_shapes(name):
    attn = get_registry("attention").create(name, 32, 2)
    assert conforms("attention", attn), "an attention backend subclasses eflow.api.SelfAttention"
    model = build_model("tiny", attention=name, num_classes=3)
    x = torch.randn(2, 3, 2, 16, 16)
    t = torch.rand(2)
    out = model(x, t, t, Condition(labels=torch.tensor([0, 1])))
    assert out.shape == x.shape and torch.isfinite(out).all()
