"""The loader: deterministic step batches, DataLoader workers, exact resume position, image mixing,
pre-encoded latents and text, and the resolution curriculum."""

from pathlib import Path

import pytest
import torch

from eflow.config import build_config
from eflow.data.batches import StepBatches, collate
from eflow.data.image_mixing import StepKinds
from eflow.data.loader import StepLoader, auto_workers
from eflow.errors import ConfigError, EflowError
from eflow.plugins.autoencoders.pixel import PixelAutoencoder
from eflow.plugins.datasets.shapes import ShapesDataset
from eflow.plugins.datasets.video_folder import VideoFolderDataset
from eflow.plugins.text_encoders.hashed_words import HashedWordsEncoder
from eflow.registry import get_registry, hookimpl, host
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("restore_threads", "private_cache")


def run_config(out, data=None, stages=None, **train):
    """A tiny run: the FM objective (one forward pass a sample) on 2 x 8 x 8 clips, unless overridden;
    `stages`: schedule.stages."""
    return build_config(
        {
            **({"schedule": {"stages": stages}} if stages is not None else {}),
            "model": {"attention": "softmax"},
            "objective": {"name": "fm"},
            "data": {"frames": 2, "height": 8, "width": 8, **(data or {})},
            "train": {
                "steps": 4,
                "batch_size": 2,
                "lr": 1e-3,
                "out": str(out),
                "device": "cpu",
                "preview_every": 0,
                "save_every": 0,
                "threads": 1,
                **train,
            },
            "sample": {"num": 2, "steps": 1},
        }
    )


# ----- step batches -------------------------------------------------------------------------------------


def test_step_batches_depend_on_seed_step_and_rank_only():
    ds = ShapesDataset(2, 8, 8, length=10)
    one = StepBatches(ds, 4, seed=3)
    assert one.indices(7) == StepBatches(ds, 4, seed=3).indices(7) != StepBatches(ds, 4, seed=4).indices(7)
    ranks = [StepBatches(ds, 4, seed=3, rank=r, world=2).indices(7) for r in range(2)]
    assert ranks[0] + ranks[1] == one.indices(7)
    epoch = [i for step in range(5) for i in one.indices(step)]  # 20 draws = two epochs of 10
    assert sorted(epoch[:10]) == list(range(10)) and sorted(epoch[10:]) == list(range(10))


def test_loader_batches_are_the_same_with_any_number_of_workers(media):
    ds = VideoFolderDataset(4, 16, 16, root=str(media / "good"), reader="pyav")
    batches = StepBatches(ds, 2, seed=1)
    inline = list(StepLoader(batches, 0, 5, workers=0))
    workers = list(StepLoader(batches, 0, 5, workers=2))
    tail = list(StepLoader(batches, 3, 5, workers=2))
    assert [b["step"] for b in workers] == [0, 1, 2, 3, 4] and [b["step"] for b in tail] == [3, 4]
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(inline[3:], tail, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
    assert auto_workers([ds]) >= 1 and auto_workers([ShapesDataset(2, 8, 8)]) == 0


def test_decord_readers_live_only_in_the_workers_and_match_pyav(media):
    pytest.importorskip("decord")
    pyav = VideoFolderDataset(4, 16, 16, root=str(media / "good"), reader="pyav")
    decord = VideoFolderDataset(4, 16, 16, root=str(media / "good"), reader="decord")
    expected = list(StepLoader(StepBatches(pyav, 2, seed=1), 0, 3, workers=0))
    got = list(StepLoader(StepBatches(decord, 2, seed=1), 0, 3, workers=2))
    assert decord._reader is None  # the main process never created a decoder: the workers did
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert a["video"].dtype == torch.uint8  # pixels travel as bytes
        assert (a["video"].float() - b["video"].float()).abs().mean() < 1.0


def test_resumed_run_sees_exactly_the_samples_of_an_uninterrupted_run(media, tmp_path, monkeypatch):
    """5 steps with a checkpoint at 2; a crash at step 3 (no save); resume: same samples, same losses."""
    seen: dict[str, list] = {}
    original_next = Trainer._next_batch

    def recording(self, step):
        batch = original_next(self, step)
        seen.setdefault(self.run_dir.name, []).append(
            (step, batch["index"].tolist(), batch["epoch"].tolist())
        )
        return batch

    monkeypatch.setattr(Trainer, "_next_batch", recording)
    data = {"name": "video-folder", "options": {"root": str(media / "good"), "reader": "pyav"}}
    data.update(frames=2, height=8, width=8)

    def config(name):
        return run_config(tmp_path / name, data, steps=5, save_every=2, workers=1)

    Trainer(config("full"), progress=False).run()
    original_step = Trainer.train_step

    def crash_at_3(self, step):
        if step == 3:
            raise RuntimeError("power cut")
        return original_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="power cut"):
        Trainer(config("crashed"), progress=False).run()
    monkeypatch.setattr(Trainer, "train_step", original_step)
    Trainer(config("crashed"), resume=True, progress=False).run()

    full, crashed = seen["full"], seen["crashed"]
    assert [s for s, _, _ in crashed] == [0, 1, 2, 2, 3, 4]  # step 2 redone after the crash
    resumed = crashed[:2] + crashed[3:]  # up to the checkpoint, then the resumed run
    assert resumed == full
    assert len({tuple(i) for _, i, _ in full}) > 1 and max(e for _, _, es in full for e in es) >= 1
    losses = lambda name: [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]  # noqa: E731
    assert losses("crashed") == losses("full")  # bit-exact on CPU


# ----- images mixed into video training ---------------------------------------------------------------


def test_step_kinds_hit_the_ratio_and_count_consistently():
    kinds = StepKinds(0.1, seed=5)
    flags = [kinds.is_image(k) for k in range(5000)]
    assert 0.08 < sum(flags) / len(flags) < 0.12
    for k in (0, 1, 1023, 1024, 1025, 3000, 4999):
        assert kinds.images_before(k) == sum(flags[:k])
    assert StepKinds(0.1, seed=5).is_image(3001) == flags[3001]  # no dependence on what was asked before
    assert [StepKinds(0.1, seed=6).is_image(k) for k in range(200)] != flags[:200]
    assert StepKinds(0.0, 1).images_before(50) == 0 and StepKinds(1.0, 1).images_before(50) == 50


def test_image_steps_are_all_image_and_both_pools_are_walked_without_skips(media):
    ds = VideoFolderDataset(4, 16, 16, root=str(media / "mixed"), reader="pyav")
    batches = StepBatches(ds, 2, seed=2, image_ratio=0.5)
    draws = {True: [], False: []}
    for step in range(12):
        _, image, keys = batches.keys(step)
        indices = [i for i, _ in keys]
        assert set(indices) <= set(ds.image_indices if image else ds.video_indices)
        draws[image] += indices
    assert 0 < len(draws[True]) < 24
    for kind, pool in ((True, ds.image_indices), (False, ds.video_indices)):
        for start in range(0, len(draws[kind]) - 1, 2):  # every epoch of a 2-item pool: each item once
            assert sorted(draws[kind][start : start + 2]) == pool
    batch = batches.get(next(k for k in range(12) if batches.kinds.is_image(k)))
    assert batch["video"].shape == (2, 3, 1, 16, 16)


def test_image_only_datasets_train_every_step_on_images(media):
    ds = VideoFolderDataset(4, 16, 16, root=str(media / "images"), reader="pyav")
    batches = StepBatches(ds, 2, seed=0)
    assert all(batches.kinds.is_image(k) for k in range(10))
    assert batches.get(3)["video"].shape == (2, 3, 1, 16, 16)
    with pytest.raises(EflowError, match="holds no images"):
        StepBatches(ShapesDataset(2, 8, 8), 2, seed=0, image_ratio=0.1)


# ----- pre-encoded latents and text embeddings -----------------------------------------------------------


class EncodedClips(torch.utils.data.Dataset):
    """Items as a latent cache gives them: latents [3, 2, 8, 8], text [L, 64] of varying L, a mask."""

    def __init__(self, frames, height, width, *, seed=0):
        self.shape = (3, frames, height, width)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        length = 2 + i % 3
        mask = torch.ones(length, dtype=torch.bool)
        mask[-1] = i % 2 == 0  # some items carry masked-out padding of their own
        return {
            "latents": torch.randn(self.shape, generator=g),
            "text": torch.randn(length, 64),
            "text_mask": mask,
        }


class EncodedClipsPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("test-encoded", EncodedClips, summary="pre-encoded latents and text (a test)")


def test_latents_and_text_items_train_without_autoencoder_or_text_encoder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("must not be called for pre-encoded items")

    monkeypatch.setattr(PixelAutoencoder, "encode", refuse)
    monkeypatch.setattr(HashedWordsEncoder, "encode", refuse)
    name = host().register(EncodedClipsPlugin(), name="test-encoded-plugin")
    try:
        cfg = run_config(tmp_path / "enc", {"name": "test-encoded", "condition": "text"}, steps=2)
        result = Trainer(cfg, progress=False).run()  # the end-of-run preview takes the items' text too
    finally:
        host().unregister(name)
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))
    assert "test-encoded" not in get_registry("dataset")


def test_collate_pads_text_and_rejects_mixed_shapes():
    items = [
        {"video": torch.zeros(3, 2, 4, 4), "text": torch.ones(2, 5), "label": 1, "caption": "a"},
        {"video": torch.zeros(3, 2, 4, 4), "text": torch.ones(4, 5), "label": 0, "caption": "b"},
    ]
    batch = collate(items)
    assert batch["video"].shape == (2, 3, 2, 4, 4) and batch["label"].tolist() == [1, 0]
    assert batch["text"].shape == (2, 4, 5) and batch["text_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["caption"] == ["a", "b"]
    items[1]["video"] = torch.zeros(3, 1, 4, 4)
    with pytest.raises(EflowError, match="differ in shape"):
        collate(items, step=3)


# ----- curriculum -----------------------------------------------------------------------------------------


def test_curriculum_changes_clip_size_and_the_model_follows_the_grid(tmp_path, monkeypatch):
    shapes = []
    original = Trainer._x0

    def recording(self, raw):
        x0 = original(self, raw)
        shapes.append(tuple(x0.shape[2:]))
        return x0

    monkeypatch.setattr(Trainer, "_x0", recording)
    stages = [{"start": 0.0, "end": 0.5, "frames": 2, "height": 8, "width": 8}, {"start": 0.5, "end": 1.0}]
    cfg = run_config(tmp_path / "cur", {"frames": 4, "height": 16, "width": 16}, stages)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    assert shapes == [(2, 8, 8), (2, 8, 8), (4, 16, 16), (4, 16, 16)]
    grids = {key[0] for key in trainer.model._rope_cache}
    assert {(2, 2, 2), (4, 4, 4)} <= grids  # tiny's 1x4x4 patch: a RoPE table per grid
    records = read_metrics(Path(cfg.train.out) / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_curriculum_stages_are_validated_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="gap between stages"):
        run_config(tmp_path, stages=[{"start": 0, "end": 0.5}, {"start": 0.6, "end": 1}])
    with pytest.raises(ConfigError, match=r"schedule\.stages\.0\.heigth"):
        run_config(tmp_path, stages=[{"start": 0, "end": 1, "heigth": 8}])
    with pytest.raises(ConfigError, match=r"data\.stages\.0\.drop_ratio: unknown field"):  # the old layout
        run_config(tmp_path, {"stages": [{"start": 0, "end": 1, "drop_ratio": 0.5}]})
    cfg = run_config(
        tmp_path / "x", stages=[{"start": 0, "end": 0.5}, {"start": 0.5, "end": 1, "height": 10}]
    )
    with pytest.raises(ConfigError, match=r"schedule.stages\[1\] \(2 frames of 10x8\).*height"):
        Trainer(cfg, progress=False).run()
