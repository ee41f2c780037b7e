"""`eflow data encode` and the `latents` dataset: shards, resume after interruption, skips, read-back."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.data.latent_shards import INDEX, LatentShards, ShardEncoder, read_index, shard_name
from eflow.data.skips import SkipEvent
from eflow.errors import ConfigError, EflowError
from eflow.plugins.autoencoders.pixel import PixelAutoencoder
from eflow.plugins.datasets.latents import LatentsDataset
from eflow.plugins.datasets.shapes import ShapesDataset
from eflow.plugins.text_encoders import hashed as hashed_module
from eflow.plugins.text_encoders.hashed import HashedEncoder
from eflow.registry import get_registry, host

runner = CliRunner()
FRAMES, SIZE, ITEMS, SHARD = 2, 8, 10, 4  # 10 shapes clips of 2x8x8 in shards of 4, 4, 2
ENCODE = ["data", "encode", "--data", "shapes", "--frames", FRAMES, "--size", SIZE, "--limit", ITEMS]
ENCODE += ["--shard-size", SHARD, "--batch-size", 3, "--device", "cpu", "--text-encoder", "hashed"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def with_hashed(fresh_host):
    """`hashed` in the registry (in-process until its entry point is declared)."""
    if "hashed" not in get_registry("text_encoder"):
        host().register(hashed_module, name="hashed")


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class PoolAutoencoder:
    """A non-trivial test autoencoder: a fixed 3 -> 4 channel mix, then 2x2 spatial average pooling."""

    latent_channels, temporal_compression, spatial_compression = 4, 1, 2

    def __init__(self, fail_on_call: int | None = None):
        self.mix = torch.linspace(-1, 1, 12).view(4, 3)
        self.calls, self.fail_on_call = 0, fail_on_call

    def latent_shape(self, shape):
        _, t, h, w = shape
        return (4, t, h // 2, w // 2)

    def encode(self, video):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the user pressing Ctrl-C in the middle of a shard
        mixed = torch.einsum("oc,bcthw->bothw", self.mix, video)
        return torch.nn.functional.avg_pool3d(mixed, (1, 2, 2))


def recipe(autoencoder, text_encoder=None, shard_size=SHARD, dtype="float32"):
    return {
        "dataset": {"name": "shapes", "options": {}, "seed": 0, "length": 10000, "limit": ITEMS},
        "clip": {"frames": FRAMES, "height": SIZE, "width": SIZE},
        "autoencoder": {
            "name": "pool",
            "options": {},
            "latent_shape": list(autoencoder.latent_shape((3, FRAMES, SIZE, SIZE))),
            "normalization": None,
        },
        "text_encoder": None
        if text_encoder is None
        else {"name": "hashed", "options": {}, "dim": text_encoder.dim},
        "shard_size": shard_size,
        "dtype": dtype,
    }


def encode_api(out, autoencoder=None, dataset=None, text=True, **kwargs):
    autoencoder = autoencoder or PoolAutoencoder()
    text_encoder = HashedEncoder(dim=8) if text else None
    encoder = ShardEncoder(
        dataset or ShapesDataset(FRAMES, SIZE, SIZE),
        autoencoder,
        out,
        recipe(autoencoder, text_encoder, **kwargs),
        text_encoder=text_encoder,
        batch_size=3,
    )
    return encoder


# ----- the command --------------------------------------------------------------------------------


def test_encode_writes_shards_and_an_index(tmp_path, with_hashed):
    result = run(*ENCODE, "--out", tmp_path / "lat")
    assert result.exit_code == 0, result.output
    assert "10 items encoded, 0 skipped, 3 of 3 shards" in result.output
    assert "--data latents --data-root" in result.output
    index = read_index(tmp_path / "lat")
    assert index["complete"] and index["counts"] == {"dataset_items": 10, "encoded": 10, "skipped": 0}
    assert [s["file"] for s in index["shards"]] == [shard_name(i) for i in range(3)]
    assert [s["items"] for s in index["shards"]] == [4, 4, 2]
    r = index["recipe"]
    assert r["autoencoder"] == {
        "name": "pixel",
        "options": {"channels": 3, "normalize": False, "mean": None, "std": None},
        "latent_shape": [3, 2, 8, 8],
        "image_latent_shape": None,
        "normalization": None,
    }
    assert r["text_encoder"]["name"] == "hashed" and r["text_encoder"]["options"]["dim"] == 64
    assert r["dataset"]["options"]["background"] == "random"  # options resolved in full
    assert index["num_classes"] == 10 and index["text_max_tokens"] == 5


def test_interrupted_and_resumed_encode_gives_byte_identical_shards(tmp_path, with_hashed):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(*ENCODE, "--out", whole).exit_code == 0
    first = run(*ENCODE, "--out", parts, "--max-shards", 1)
    assert first.exit_code == 0 and "stopped early" in first.output
    assert sorted(p.name for p in parts.iterdir()) == [INDEX, shard_name(0)]
    assert not read_index(parts)["complete"]
    with pytest.raises(EflowError, match="incomplete"):
        LatentShards(parts)
    second = run(*ENCODE, "--out", parts)
    assert second.exit_code == 0, second.output
    assert "resuming" in second.output and "1 of 3 shards done" in second.output
    assert folder_bytes(parts) == folder_bytes(whole)
    again = run(*ENCODE, "--out", parts)
    assert again.exit_code == 0 and "already complete" in again.output


def test_ctrl_c_during_encode_says_how_far_it_got(tmp_path, with_hashed, monkeypatch):
    real = ShardEncoder._encode_shard

    def interrupted_in_second_shard(self, number, *args):
        if number == 1:
            raise KeyboardInterrupt
        return real(self, number, *args)

    monkeypatch.setattr(ShardEncoder, "_encode_shard", interrupted_in_second_shard)
    result = run(*ENCODE, "--out", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "interrupted: 1 of 3 shards are complete" in result.output
    monkeypatch.setattr(ShardEncoder, "_encode_shard", real)
    assert run(*ENCODE, "--out", tmp_path).exit_code == 0 and read_index(tmp_path)["complete"]


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, with_hashed):
    out = tmp_path / "lat"
    assert run(*ENCODE, "--out", out, "--max-shards", 1).exit_code == 0
    result = run(*ENCODE[:-2], "--out", out, "--max-shards", 1, "--shard-size", 5)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "recipe.shard_size: 4 in the index, 5 now" in result.output
    assert "recipe.text_encoder" in result.output  # dropped --text-encoder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = run(*ENCODE, "--out", tmp_path / "other")
    assert result.exit_code == 2 and "not empty" in result.output


def test_train_command_hint_and_dataset_read_back(tmp_path, with_hashed):
    out = tmp_path / "lat"
    assert run(*ENCODE, "--out", out).exit_code == 0
    dataset = get_registry("dataset").create("latents", FRAMES, SIZE, SIZE, options={"root": str(out)})
    shapes, enc = ShapesDataset(FRAMES, SIZE, SIZE), HashedEncoder()
    assert len(dataset) == ITEMS and dataset.num_classes == 10 and dataset.classes[0] == "left"
    for k in range(ITEMS):
        item, ref = dataset[k], shapes[k]
        assert torch.equal(item["latents"], PixelAutoencoder().encode(ref["video"][None])[0])
        assert item["label"] == ref["label"] and item["caption"] == ref["caption"]
        text, mask = enc.encode([ref["caption"]])
        n = int(mask.sum())
        assert item["text"].shape == (n, 64) and item["text_mask"].all()  # the real tokens; collation pads
        assert torch.equal(item["text"], text[0, :n])


# ----- the writer and reader through the API ------------------------------------------------------


def test_latents_read_back_equal_to_the_autoencoders_output(tmp_path):
    ae = PoolAutoencoder()
    encode_api(tmp_path, autoencoder=ae).run()
    shards, shapes = LatentShards(tmp_path), ShapesDataset(FRAMES, SIZE, SIZE)
    videos = torch.stack([shapes[k]["video"] for k in range(ITEMS)])
    expected = ae.encode(videos)
    assert torch.equal(torch.stack([shards.item(k)["latents"] for k in range(ITEMS)]), expected)
    assert shards.item(3)["latents"].shape == (4, FRAMES, SIZE // 2, SIZE // 2)
    assert [shards.dataset_index(k) for k in range(ITEMS)] == list(range(ITEMS))


def test_a_crash_inside_a_shard_leaves_only_whole_shards_and_resume_matches(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    encode_api(whole).run()
    with pytest.raises(KeyboardInterrupt):
        encode_api(
            crashed, autoencoder=PoolAutoencoder(fail_on_call=4)
        ).run()  # 2 batches a shard: dies in shard 1
    assert sorted(p.name for p in crashed.iterdir()) == [
        INDEX,
        shard_name(0),
    ]  # no partial shard, no temp file
    assert len(read_index(crashed)["shards"]) == 1
    encoder = encode_api(crashed)
    assert encoder.shards_done == 1 and encoder.items_done == SHARD
    encoder.run()
    assert folder_bytes(crashed) == folder_bytes(whole)


class FlakyShapes(ShapesDataset):
    """Shapes where some items stand for files that cannot be decoded."""

    bad: ClassVar[set[int]] = {2, 7}

    def __getitem__(self, index):
        if index in self.bad:
            raise OSError(f"invalid data found when processing input (clip {index})")
        return super().__getitem__(index)

    def describe(self, index):
        return f"clips/{index:03d}.mp4"


def test_unreadable_items_are_skipped_listed_and_counted(tmp_path):
    seen = []
    index = encode_api(tmp_path, dataset=FlakyShapes(FRAMES, SIZE, SIZE)).run(on_skip=seen.append)
    assert index["counts"] == {"dataset_items": 10, "encoded": 8, "skipped": 2}
    assert (
        [s["file"] for s in index["skipped"]]
        == ["clips/002.mp4", "clips/007.mp4"]
        == [s["file"] for s in seen]
    )
    assert "OSError: invalid data" in index["skipped"][0]["reason"]
    shards = LatentShards(tmp_path)
    assert len(shards) == 8 and [shards.dataset_index(k) for k in range(8)] == [0, 1, 3, 4, 5, 6, 8, 9]
    assert shards.item(2)["label"] == ShapesDataset(FRAMES, SIZE, SIZE)[3]["label"]


class ReportingShapes(ShapesDataset):
    """Shapes that reports bad files the way video-folder does: skip events, a failing file replaced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = [SkipEvent("clips/never-opened.mp4", "unreadable", "moov atom not found")]  # start-up

    def __getitem__(self, index):
        if index == 4:  # its file fails to decode: the dataset hands over item 5 instead
            self.events.append(SkipEvent("clips/004.mp4", "corrupt", "decoding failed at frame 3"))
            return super().__getitem__(5)
        return super().__getitem__(index)

    def take_skips(self):
        events, self.events = self.events, []
        return events


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_events_are_recorded_and_replacements_dropped(tmp_path, workers):
    encoder = encode_api(tmp_path, dataset=ReportingShapes(FRAMES, SIZE, SIZE))
    encoder.workers = workers  # read in worker processes: their events travel back with the items
    index = encoder.run()
    assert index["skipped"] == [
        {"index": None, "file": "clips/never-opened.mp4", "reason": "unreadable: moov atom not found"},
        {"index": 4, "file": "clips/004.mp4", "reason": "corrupt: decoding failed at frame 3"},
    ]
    assert index["counts"] == {"dataset_items": 10, "encoded": 9, "skipped": 2}
    shards = LatentShards(tmp_path)
    assert [shards.dataset_index(k) for k in range(9)] == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # item 5 once


class ShapesWithImages(ShapesDataset):
    """Every third item is a one-frame image, as video-folder yields for image files."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_indices = [i for i in range(ITEMS) if i % 3 == 0]

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if index in self.image_indices:
            item["video"] = item["video"][:, :1]
        return item


def test_images_are_stored_apart_and_read_back_as_one_frame_latents(tmp_path):
    ae, dataset = PoolAutoencoder(), ShapesWithImages(FRAMES, SIZE, SIZE)
    r = recipe(ae)
    r["autoencoder"]["image_latent_shape"] = list(ae.latent_shape((3, 1, SIZE, SIZE)))
    ShardEncoder(dataset, ae, tmp_path, r, batch_size=3).run()
    latents = get_registry("dataset").create("latents", FRAMES, SIZE, SIZE, options={"root": str(tmp_path)})
    assert latents.image_indices == [0, 3, 6, 9]
    for k in range(ITEMS):
        expected = ae.encode(dataset[k]["video"][None])[0]
        assert torch.equal(latents[k]["latents"], expected), k
    assert latents[3]["latents"].shape == (4, 1, 4, 4) and latents[4]["latents"].shape == (4, FRAMES, 4, 4)


def test_a_dataset_with_no_readable_item_fails(tmp_path):
    class Broken(FlakyShapes):
        bad: ClassVar[set[int]] = set(range(ITEMS))

    with pytest.raises(EflowError, match="no item of the dataset could be read"):
        encode_api(tmp_path, dataset=Broken(FRAMES, SIZE, SIZE)).run()


def test_bfloat16_storage_is_stored_as_bfloat16_and_reads_back_as_float32(tmp_path):
    from safetensors import safe_open

    encode_api(tmp_path, text=False, dtype="bfloat16").run()
    with safe_open(str(tmp_path / shard_name(0)), framework="pt") as f:
        assert f.get_tensor("latents").dtype == torch.bfloat16
    item = LatentShards(tmp_path).item(0)
    expected = PoolAutoencoder().encode(ShapesDataset(FRAMES, SIZE, SIZE)[0]["video"][None])[0]
    assert item["latents"].dtype == torch.float32 and "text" not in item
    assert torch.equal(item["latents"], expected.bfloat16().float())


# ----- the latents dataset's checks ---------------------------------------------------------------


def test_latents_dataset_explains_every_mismatch(tmp_path):
    encode_api(tmp_path).run()
    with pytest.raises(ConfigError, match="--data-root"):
        LatentsDataset(FRAMES, SIZE, SIZE)
    with pytest.raises(
        ConfigError, match=r"hold 2 frames of 8x8, the run asks for 4 frames of 8x8; use --frames 2"
    ):
        LatentsDataset(4, SIZE, SIZE, root=str(tmp_path))
    with pytest.raises(EflowError, match="holds no latents"):
        LatentsDataset(FRAMES, SIZE, SIZE, root=str(tmp_path / "nowhere"))
    dataset = LatentsDataset(FRAMES, SIZE, SIZE, root=str(tmp_path))
    dataset.check_run("pool", (4, FRAMES, 4, 4), "hashed", 8)  # the encoding run: fine
    with pytest.raises(ConfigError, match=r"encoded by autoencoder 'pool'.*the run uses 'pixel'"):
        dataset.check_run("pixel", (3, FRAMES, SIZE, SIZE))
    with pytest.raises(ConfigError, match=r"text encoder 'hashed' \(8-d.*the run uses 'minilm' \(384-d\)"):
        dataset.check_run("pool", (4, FRAMES, 4, 4), "minilm", 384)


def test_index_json_is_checked(tmp_path):
    (tmp_path / INDEX).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EflowError, match="not an eflow latent index"):
        read_index(tmp_path)


def test_storage_dtype_takes_the_precision_spellings_too():
    from eflow.data.latent_shards import storage_dtype_name
    from eflow.errors import ConfigError

    assert [storage_dtype_name(n) for n in ("bf16", "fp16", "fp32", "bfloat16")] == [
        "bfloat16",
        "float16",
        "float32",
        "bfloat16",
    ]
    with pytest.raises(
        ConfigError, match=r"--dtype 'float8': choose one of float32, bfloat16, float16, fp32"
    ):
        storage_dtype_name("float8")
