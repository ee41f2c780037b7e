"""Autoencoder `wan`: a tiny random-weight AutoencoderKLWan loaded from a folder, offline (needs diffusers)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from eflow.errors import ConfigError, EflowError
from eflow.registry import get_registry

# The tiny Wan 2.1 architecture of shared/notes/data-eval-scale.md: real layout, 14k parameters.
TINY = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """(folder of a Wan repository with vae/, the diffusers model itself) with non-trivial normalization."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    mean = torch.linspace(-1.0, 1.0, 16).tolist()
    std = torch.linspace(0.5, 2.0, 16).tolist()
    model = diffusers.AutoencoderKLWan(**TINY, latents_mean=mean, latents_std=std).eval()
    repo = tmp_path_factory.mktemp("wan")
    model.save_pretrained(str(repo / "vae"))
    return repo, model


def create(**options):
    return get_registry("autoencoder").create("wan", options=options)


def test_latent_shape_is_16_channels_4x_time_8x_space(tiny_vae):
    ae = create(path=str(tiny_vae[0]))
    assert ae.latent_shape((3, 17, 32, 48)) == (16, 5, 4, 6)
    assert ae.latent_shape((3, 1, 16, 16)) == (16, 1, 2, 2)  # an image is one frame
    assert (ae.latent_channels, ae.temporal_compression, ae.spatial_compression) == (16, 4, 8)


def test_round_trip_is_finite_with_the_input_shape(tiny_vae):
    ae = create(path=str(tiny_vae[0]))
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    latents = ae.encode(video)
    assert (
        latents.shape == (2, 16, 3, 2, 2) and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    )
    out = ae.decode(latents)
    assert out.shape == video.shape and torch.isfinite(out).all() and out.abs().max() <= 1


def test_latents_are_normalized_per_channel_and_decode_inverts_it(tiny_vae):
    repo, model = tiny_vae
    ae = create(path=str(repo), tiling=False, slicing=False)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean = torch.tensor(model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        mu = model.encode(video).latent_dist.mode()
        latents = ae.encode(video)
        assert torch.allclose(latents, (mu - mean) / std, atol=1e-5)  # the posterior mean, normalized
        assert torch.allclose(ae.decode(latents), model.decode(mu).sample, atol=1e-5)
    assert ae.normalization()["std"] == pytest.approx(model.config.latents_std)


@pytest.mark.parametrize("frames,nearest", [(31, "use 29 or 33"), (8, "use 5 or 9"), (2, "use 1 or 5")])
def test_frame_counts_other_than_4k_plus_1_are_refused_with_the_nearest_valid_ones(tiny_vae, frames, nearest):
    ae = create(path=str(tiny_vae[0]))
    with pytest.raises(ConfigError, match=f"frames={frames} is not 4k\\+1.*{nearest}"):
        ae.latent_shape((3, frames, 16, 16))
    with pytest.raises(ConfigError, match=nearest):
        ae.encode(torch.zeros(1, 3, frames, 16, 16))


def test_sizes_that_are_not_multiples_of_8_are_refused(tiny_vae):
    with pytest.raises(ConfigError, match=r"width=20 is not a multiple of 8.*use 16 or 24"):
        create(path=str(tiny_vae[0])).latent_shape((3, 5, 16, 20))


def test_tiled_decode_blends_tiles_into_the_full_frame(tiny_vae):
    tiled = create(
        path=str(tiny_vae[0]), tiling=True, tile_size=32, tile_stride=24
    )  # 32x48 frames: 2x2 overlapping tiles
    latents = torch.randn(1, 16, 2, 4, 6)
    out = tiled.decode(latents)
    assert out.shape == (1, 3, 5, 32, 48) and torch.isfinite(out).all()
    assert tiled.vae.use_tiling and tiled.vae.tile_sample_min_height == 32
    whole = create(path=str(tiny_vae[0]), tiling=False).decode(latents)
    # the tiles are blended into (nearly) the untiled frame, not a different picture
    assert (out - whole).abs().mean() < 0.2 * whole.abs().mean()


def test_a_bare_vae_folder_loads_too_and_subfolder_overrides(tiny_vae):
    repo, _ = tiny_vae
    assert create(path=str(repo / "vae")).folder == repo / "vae"
    assert create(path=str(repo), subfolder="vae").folder == repo / "vae"
    with pytest.raises(ConfigError, match=r"no config\.json"):
        create(path=str(repo), subfolder="")


def test_missing_weights_path_and_config_fields_are_explained(tiny_vae, tmp_path):
    with pytest.raises(ConfigError, match="--vae-path"):
        create()
    with pytest.raises(ConfigError, match="not a folder"):
        create(path=str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((tiny_vae[0] / "vae" / "config.json").read_text())
    del config["latents_std"]
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="latents_std"):
        create(path=str(broken))


def test_missing_diffusers_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a)
    )
    with pytest.raises(EflowError, match=r"eflow\[wan\]"):
        create(path="/nowhere")
