"""Data side: the shapes dataset, pixel autoencoder, hashed-words text encoder, video I/O and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eflow.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from eflow.data import video_io
from eflow.data.video_io import read_video, to_uint8, write_gif, write_grid_png, write_mp4
from eflow.errors import ConfigError
from eflow.plugins.autoencoders.pixel import PixelAutoencoder
from eflow.plugins.datasets.shapes import (
    CLASSES,
    COLOURS,
    MOTION_PHRASES,
    SHAPES,
    ShapesDataset,
    write_preview,
)
from eflow.plugins.text_encoders.hashed_words import HashedWordsEncoder, word_vector
from eflow.registry import get_registry

# ----- shapes: determinism, range, sizes ------------------------------------------------------------


def test_shapes_deterministic_from_seed_and_index():
    a, b = ShapesDataset(8, 16, 16, seed=3), ShapesDataset(8, 16, 16, seed=3)
    first = a[5]
    assert torch.equal(first["video"], a[5]["video"]) and torch.equal(first["video"], b[5]["video"])
    assert first["caption"] == b[5]["caption"] and first["label"] == b[5]["label"]
    other = a[5 + a.num_classes]  # same class, different clip
    assert other["label"] == first["label"] and not torch.equal(other["video"], first["video"])
    reseeded = ShapesDataset(8, 16, 16, seed=4)[5]
    assert not torch.equal(reseeded["video"], first["video"])


def test_shapes_does_not_touch_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    ShapesDataset(4, 16, 16)[7]
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.parametrize(
    "frames,height,width", [(1, 16, 16), (8, 16, 16), (16, 64, 64), (3, 24, 40), (2, 9, 7)]
)
def test_shapes_any_size_in_range(frames, height, width):
    ds = ShapesDataset(frames, height, width, seed=1, length=50)
    assert len(ds) == 50
    for i in range(ds.num_classes):
        item = ds[i]
        video = item["video"]
        assert video.shape == (3, frames, height, width) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        assert item["label"] == i and isinstance(item["caption"], str)
        assert video.amax() - video.amin() > 0.5  # a visible shape on the background


def test_shapes_index_bounds_and_negative_index():
    ds = ShapesDataset(2, 8, 8, length=12)
    assert torch.equal(ds[-1]["video"], ds[11]["video"])
    with pytest.raises(IndexError):
        ds[12]


def test_shapes_captions_name_colour_shape_and_motion():
    ds = ShapesDataset(4, 16, 16)
    for i in range(3 * ds.num_classes):
        item = ds[i]
        caption = item["caption"]
        assert caption.endswith(MOTION_PHRASES[CLASSES[item["label"]]])
        assert any(f" {c} " in caption for c in COLOURS) and any(f" {s} " in caption for s in SHAPES)
        assert caption.split()[0] in ("a", "an")


def test_shapes_at_least_eight_motion_classes():
    assert len(CLASSES) >= 8 and ShapesDataset(2, 8, 8).num_classes == len(CLASSES)
    assert set(MOTION_PHRASES) == set(CLASSES)


def test_shapes_class_subset_and_registry_options():
    registry = get_registry("dataset")
    ds = registry.create("shapes", 4, 16, 16, seed=0, length=20, options={"classes": ["right", "left"]})
    assert ds.num_classes == 2 and ds.classes == ("right", "left")
    assert ds[0]["caption"].endswith("moving right") and ds[1]["caption"].endswith("moving left")
    with pytest.raises(ConfigError, match="clases"):
        registry.create("shapes", 4, 16, 16, options={"clases": ["left"]})
    with pytest.raises(ConfigError, match="classes"):
        registry.create("shapes", 4, 16, 16, options={"classes": ["sideways"]})
    assert "frames" not in registry.get("shapes").options.model_fields


def test_shapes_batch_through_dataloader():
    loader = torch.utils.data.DataLoader(ShapesDataset(4, 16, 16, length=8), batch_size=4)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 3, 4, 16, 16)
    assert batch["label"].tolist() == [0, 1, 2, 3] and len(batch["caption"]) == 4


# ----- shapes: classes differ by motion ----------------------------------------------------------------


def track(video: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[3, T, H, W] -> centroid x [T], y [T] and soft area [T] of the pixels that differ from the background."""
    bg = video[:, 0].flatten(1).median(dim=1).values
    diff = (video - bg[:, None, None, None]).norm(dim=0)  # [T, H, W]
    weight = (diff / diff.max()).clamp(0, 1).double()
    _, h, w = weight.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    area = weight.sum(dim=(1, 2))
    x = (weight * xs).sum(dim=(1, 2)) / area
    y = (weight * ys).sum(dim=(1, 2)) / area
    return x.numpy(), y.numpy(), area.numpy()


@pytest.fixture(scope="module")
def tracks() -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]]]:
    ds = ShapesDataset(8, 32, 32, seed=11)
    out: dict[str, list] = {c: [] for c in CLASSES}
    for i in range(12 * ds.num_classes):
        item = ds[i]
        out[CLASSES[item["label"]]].append((*track(item["video"]), item["video"]))
    return out


@pytest.mark.parametrize(
    "motion,axis,sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)]
)
def test_linear_motions_move_monotonically(tracks, motion, axis, sign):
    for x, y, area, _ in tracks[motion]:
        along, across = (x, y) if axis == 0 else (y, x)
        assert sign * (along[-1] - along[0]) > 5  # several pixels of travel in 32
        assert (sign * np.diff(along) > 0).all()  # every frame moves the right way
        assert np.ptp(across) < 0.5 and np.ptp(area) / area.mean() < 0.2


def test_bounce_goes_down_and_up_in_place(tracks):
    for x, y, _, _ in tracks["bounce"]:
        steps = np.diff(y)
        assert np.ptp(y) > 4 and np.ptp(x) < 0.5
        assert (steps > 0.5).any() and (steps < -0.5).any()  # falls and rises within the clip


def test_rotate_spins_in_place(tracks):
    for x, y, area, video in tracks["rotate"]:
        assert np.ptp(x) < 0.6 and np.ptp(y) < 0.6 and np.ptp(area) / area.mean() < 0.15
        change = (video[:, 1:] - video[:, :-1]).abs().amax(dim=(0, 2, 3))
        assert (change > 0.3).all()  # the outline changes every frame


@pytest.mark.parametrize("motion,sign", [("grow", 1), ("shrink", -1)])
def test_grow_and_shrink_scale_in_place(tracks, motion, sign):
    for x, y, area, _ in tracks[motion]:
        assert np.ptp(x) < 0.6 and np.ptp(y) < 0.6
        assert (sign * np.diff(area) > 0).all()
        assert max(area[0], area[-1]) > 3 * min(area[0], area[-1])


def test_orbit_circles_with_constant_turn(tracks):
    for x, y, area, _ in tracks["orbit"]:
        assert np.ptp(x) > 4 and np.ptp(y) > 4 and np.ptp(area) / area.mean() < 0.2
        v = np.stack([np.diff(x), np.diff(y)], axis=1)
        cross = v[:-1, 0] * v[1:, 1] - v[:-1, 1] * v[1:, 0]
        assert (cross > 0).all() or (cross < 0).all()  # always turning the same way


def test_still_does_not_move(tracks):
    for _, _, _, video in tracks["still"]:
        assert torch.equal(video, video[:, :1].expand_as(video))


def test_write_preview(tmp_path):
    paths = write_preview(tmp_path, num=3, frames=4, height=16, width=16)
    assert [p.suffix for p in paths] == [".mp4"] * 3 + [".png"]
    assert all(p.exists() for p in paths)
    assert read_video(paths[0]).shape[0] == 4 and Image.open(paths[-1]).size[0] > 16


# ----- pixel autoencoder -----------------------------------------------------------------------------------


def test_pixel_autoencoder_identity():
    ae = get_registry("autoencoder").create("pixel")
    assert isinstance(ae, PixelAutoencoder) and not list(ae.parameters())
    assert (ae.latent_channels, ae.temporal_compression, ae.spatial_compression) == (3, 1, 1)
    video = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    latents = ae.encode(video)
    assert torch.equal(latents, video) and torch.equal(ae.decode(latents), video)
    assert ae.decode(torch.full((1, 3, 1, 2, 2), 3.0)).max() == 1
    assert ae.latent_shape((3, 5, 16, 24)) == (3, 5, 16, 24)
    with pytest.raises(ValueError, match="channels"):
        ae.encode(torch.zeros(1, 1, 2, 4, 4))


# ----- hashed-words text encoder ---------------------------------------------------------------------------


def test_hashed_words_mask_padding_and_truncation():
    enc = HashedWordsEncoder(dim=8, max_tokens=5)
    assert not list(enc.parameters())
    emb, mask = enc.encode(["A red square, moving LEFT!", "", "one two three four five six seven"])
    assert emb.shape == (3, 5, 8) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 5, [False] * 5, [True] * 5]
    assert torch.equal(emb[0, 1], torch.from_numpy(word_vector("red", 8)))
    assert torch.equal(emb[2, 4], torch.from_numpy(word_vector("five", 8)))  # truncated after 5 words
    short_emb, short_mask = enc.encode(["red circle"])
    assert short_mask[0].tolist() == [True, True, False, False, False]
    assert torch.equal(short_emb[0, 0], emb[0, 1]) and (short_emb[0, 2:] == 0).all()
    assert not torch.allclose(emb[0, 0], emb[0, 1])


def test_hashed_words_stable_across_processes():
    code = (
        "import json; from eflow.plugins.text_encoders.hashed_words import HashedWordsEncoder as E;"
        "e, m = E(dim=16, max_tokens=4).encode(['a blue triangle orbiting']);"
        "print(json.dumps(e.flatten().tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "EFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here, _ = HashedWordsEncoder(dim=16, max_tokens=4).encode(["a blue triangle orbiting"])
    assert json.loads(result.stdout) == here.flatten().tolist()


def test_hashed_words_registered_with_options():
    enc = get_registry("text_encoder").create("hashed-words", options={"dim": 32, "max_tokens": 3})
    emb, mask = enc.encode(["x y"])
    assert enc.dim == 32 and emb.shape == (1, 3, 32) and mask.sum() == 2


# ----- video I/O ------------------------------------------------------------------------------------------


def test_to_uint8_layout_and_range():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    frames = to_uint8(video)
    assert frames.shape == (4, 1, 1, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


def clip(frames=6, size=16):
    return ShapesDataset(frames, size, size, seed=2)[6]["video"]  # class "grow": every frame differs


@pytest.mark.parametrize(
    "scale,expected", [(1, (6, 16, 16, 3)), (None, (6, 128, 128, 3)), (3, (6, 48, 48, 3))]
)
def test_mp4_round_trip(tmp_path, scale, expected):
    video = clip()
    path = write_mp4(tmp_path / "clip.mp4", video, fps=8, scale=scale)
    frames = read_video(path)
    assert frames.shape == expected
    s = expected[1] // 16
    original = np.repeat(np.repeat(to_uint8(video), s, axis=1), s, axis=2)
    assert np.abs(frames.astype(int) - original).mean() < 12
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_mp4_odd_size_single_frame_and_uint8_input(tmp_path):
    frames = read_video(write_mp4(tmp_path / "odd.mp4", ShapesDataset(3, 15, 9)[0]["video"], scale=1))
    assert frames.shape == (3, 16, 10, 3)  # padded to even
    one = read_video(write_mp4(tmp_path / "one.mp4", np.zeros((1, 16, 16, 3), np.uint8), scale=1))
    assert one.shape == (1, 16, 16, 3)


def test_gif_single_and_batch(tmp_path):
    gif = Image.open(write_gif(tmp_path / "one.gif", clip(), fps=10, scale=2))
    assert gif.n_frames == 6 and gif.size == (32, 32)
    batch = torch.stack([clip(), clip(), clip()])
    grid = Image.open(write_gif(tmp_path / "many.gif", batch))
    assert grid.n_frames == 6 and grid.size == (2 * (128 + 2) + 2, 2 * (128 + 2) + 2)


def test_grid_png_layout(tmp_path):
    videos = torch.stack([ShapesDataset(10, 16, 16)[i]["video"] for i in range(3)])
    image = np.asarray(Image.open(write_grid_png(tmp_path / "grid.png", videos)).convert("RGB"))
    assert image.shape == (3 * 66 + 2, 8 * 66 + 2, 3)  # 8 columns of 16 px upscaled to 64, 2 px gutters
    assert (image[:2] == 255).all() and (image[:, 66:68] == 255).all()
    image = np.asarray(Image.open(write_grid_png(tmp_path / "four.png", videos, frames=4, scale=1)))
    assert image.shape[:2] == (3 * 18 + 2, 4 * 18 + 2)
    image = np.asarray(Image.open(write_grid_png(tmp_path / "still.png", videos[:, :, :1], scale=1)))
    assert image.shape[:2] == (3 * 18 + 2, 18 + 2)


# ----- atomic writes --------------------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["state.bin"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors" and tmp != path
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.safetensors"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.bin"):
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_writer_failure_does_not_clobber(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    path.write_bytes(b"previous grid")

    def broken(*args, **kwargs):
        raise OSError("encoder exploded")

    monkeypatch.setattr(video_io.Image, "fromarray", broken)
    with pytest.raises(OSError, match="exploded"):
        write_grid_png(path, clip()[None])
    assert path.read_bytes() == b"previous grid" and os.listdir(tmp_path) == ["grid.png"]
