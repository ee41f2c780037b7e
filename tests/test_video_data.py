"""Video data: readers, clip windows, resize + crop, the video-folder and captions datasets, bad files, CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import FRAME_RED, VFR_PTS_MS
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.data import media_scan, readers
from eflow.data.clip_window import fps_window, stride_window
from eflow.data.readers import PyAVReader, make_reader, read_image
from eflow.data.resize_crop import resize_center_crop, resized_size, to_signed
from eflow.data.skips import MediaError, SkipLog
from eflow.errors import ConfigError, EflowError
from eflow.plugins.datasets.captions import CaptionsDataset
from eflow.plugins.datasets.video_folder import VideoFolderDataset
from eflow.registry import get_registry
from eflow.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("restore_threads", "private_cache")


def red_levels(frames: np.ndarray) -> np.ndarray:
    """Mean red level of each frame [T, H, W, 3] away from the moving white box (the bottom rows)."""
    return frames[:, -8:, :, 0].reshape(len(frames), -1).mean(axis=1)


def frame_ids(frames: np.ndarray) -> list[int]:
    """Which written frame each decoded frame is (inverting FRAME_RED)."""
    return [round((r - FRAME_RED(0)) / (FRAME_RED(1) - FRAME_RED(0))) for r in red_levels(frames)]


# ----- readers ----------------------------------------------------------------------------------------


def test_pyav_reader_gives_the_requested_frames_and_container_timestamps(media):
    with PyAVReader().open(media / "good" / "jump" / "a.mp4") as video:
        assert len(video) == 12
        assert np.allclose(video.timestamps, np.arange(12) / 24, atol=1e-3)
        frames = video.frames([7, 2, 2, 11])
    assert frames.shape == (4, 144, 176, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == [7, 2, 2, 11]
    with PyAVReader().open(media / "good" / "jump" / "vfr.mp4") as video:
        assert np.allclose(video.timestamps, np.array(VFR_PTS_MS) / 1000, atol=1e-3)
        assert frame_ids(video.frames([1, 2, 10])) == [1, 2, 10]


@pytest.mark.parametrize("name", ["jump/a.mp4", "jump/vfr.mp4", "run/b.mp4", "run/c.mp4"])
def test_decord_and_pyav_return_the_same_frames(media, name):
    pytest.importorskip("decord")
    indices = [0, 3, 4, 7]
    with (
        readers.PyAVReader().open(media / "good" / name) as a,
        readers.DecordReader().open(media / "good" / name) as b,
    ):
        assert len(a) == len(b)
        assert np.allclose(a.timestamps, b.timestamps, atol=1e-3)
        fa, fb = a.frames(indices).astype(int), b.frames(indices).astype(int)
    assert fa.shape == fb.shape
    assert np.abs(fa - fb).mean() < 1.0 and np.abs(fa - fb).max() <= 8  # decoder/colour-conversion rounding


def test_reader_choice(monkeypatch):
    assert make_reader("pyav").name == "pyav"
    assert make_reader("auto").name == ("decord" if readers.decord_available() else "pyav")
    monkeypatch.setattr(readers, "decord_available", lambda: False)
    assert make_reader("auto").name == "pyav"
    with pytest.raises(ConfigError, match=r"decord is not installed.*--reader pyav"):
        make_reader("decord")
    with pytest.raises(ConfigError, match="auto, pyav, decord"):
        make_reader("ffmpeg")


def test_bad_files_raise_media_errors_with_a_reason(media):
    with pytest.raises(MediaError) as err:
        PyAVReader().open(media / "bad" / "jump" / "truncated.mp4")
    assert err.value.reason == "unreadable"
    with PyAVReader().open(media / "bad" / "run" / "zeroed.mp4") as video, pytest.raises(MediaError) as err:
        video.frames([0, 1, 2, 3])
    assert err.value.reason == "corrupt"
    with pytest.raises(MediaError, match="unreadable"):
        read_image(media / "bad" / "run" / "notes.mp4")


# ----- clip windows, resize + crop --------------------------------------------------------------------


def test_stride_window_fits_inside_the_video_or_segment():
    t = np.arange(20) / 10
    assert stride_window(t, 4, 3, 0.0).tolist() == [0, 3, 6, 9]
    assert stride_window(t, 4, 3, 0.999).tolist() == [10, 13, 16, 19]
    assert stride_window(t, 3, 1, 0.999, start=0.5, end=1.0).tolist() == [7, 8, 9]  # frames 5..9
    with pytest.raises(MediaError, match="too_short"):
        stride_window(t, 8, 3, 0.5)


def test_fps_window_follows_timestamps_of_a_variable_frame_rate():
    t = np.array(VFR_PTS_MS) / 1000
    # at 50 fps from t = 0: 0, 20, 40, 60, 80 ms -> on screen: frames 0, 1, 1, 1, 2
    assert fps_window(t, 5, 50.0, 0.0).tolist() == [0, 1, 1, 1, 2]
    # 10 fps, 200 ms span; start at u = 0.5 of the 220 ms of slack: 110, 210, 310 ms
    assert fps_window(t, 3, 10.0, 0.5).tolist() == [3, 5, 7]  # on screen: 100, 180, 260 ms
    with pytest.raises(MediaError, match="too_short"):
        fps_window(t, 10, 10.0, 0.5)  # 0.9 s > 0.42 s


def test_resize_center_crop_keeps_the_centre_at_the_target_size():
    frames = np.zeros((2, 272, 640, 3), np.uint8)
    frames[:, :, 320:, 1] = 255  # right half green
    clip = resize_center_crop(frames, 16, 16)
    assert clip.shape == (3, 2, 16, 16) and clip.dtype == torch.uint8
    green = clip[1, 0, 8]  # a middle row: the left half of the crop black, the right half green
    assert (green[:7] < 10).all() and (green[9:] > 245).all()
    signed = to_signed(clip)
    assert signed.dtype == torch.float32 and signed.min() == -1 and signed.max() == 1
    assert to_signed(signed) is signed
    assert resized_size(144, 176, 16, 16) == (16, 20) and resized_size(272, 640, 32, 64) == (32, 75)
    assert resize_center_crop(frames[:, :16, :16], 16, 16).shape == (3, 2, 16, 16)  # no resize needed


# ----- video-folder -----------------------------------------------------------------------------------


def folder(media, name, frames=4, size=16, **options):
    return VideoFolderDataset(frames, size, size, root=str(media / name), reader="pyav", **options)


def test_video_folder_labels_from_sorted_class_folders(media):
    ds = folder(media, "good")
    assert ds.classes == ["jump", "run"] and ds.num_classes == 2 and len(ds) == 4
    assert [e.label for e in ds.entries] == [0, 0, 1, 1] and ds.image_indices == []
    for i in range(len(ds)):  # 176x144 and 640x272 sources, one shape out
        item = ds[i]
        assert item["video"].shape == (3, 4, 16, 16) and item["label"] == ds.entries[i].label
        assert item["video"].dtype == torch.float32 and item["video"].min() >= -1 and item["video"].max() <= 1
        pixels = ds.item(i, 0)["video"]  # what the loader ships: uint8, mapped to [-1, 1] by the trainer
        assert pixels.dtype == torch.uint8 and torch.equal(to_signed(pixels), item["video"])
    assert ds.take_skips() == []


def test_video_folder_windows_depend_on_seed_epoch_and_index_only(media):
    a, b = folder(media, "good", seed=3), folder(media, "good", seed=3)
    assert torch.equal(a.item(0, 5)["video"], b.item(0, 5)["video"])
    windows = {tuple(a.item(0, e)["video"][0, :, -2:].float().mean(dim=(1, 2)).tolist()) for e in range(6)}
    assert len(windows) > 1  # a new window in other epochs
    assert not all(
        torch.equal(folder(media, "good", seed=4).item(0, e)["video"], a.item(0, e)["video"])
        for e in range(4)
    )


def test_video_folder_stride_and_fps_pick_the_right_frames(media):
    ds = folder(media, "good", frames=3, size=32, stride=4)  # a.mp4: 12 frames, windows start at 0..3
    for epoch in range(3):
        red = ds.item(0, epoch)["video"][0, :, -4:].float().mean(dim=(1, 2)).numpy()  # the flat red rows
        start = round((red[0] - FRAME_RED(0)) / (FRAME_RED(1) - FRAME_RED(0)))
        assert 0 <= start <= 3
        assert np.allclose(red, [FRAME_RED(start), FRAME_RED(start + 4), FRAME_RED(start + 8)], atol=3)
    by_fps = folder(media, "good", frames=3, size=32, fps=6.0)  # 24 fps source: every 4th frame
    red = by_fps.item(0, 0)["video"][0, :, -4:].float().mean(dim=(1, 2)).numpy()
    assert np.allclose(np.diff(red), 4 * (FRAME_RED(1) - FRAME_RED(0)), atol=3)


def test_flat_folders_and_images(media):
    images = folder(media, "images")
    assert images.classes == ["images"] and images.image_indices == [0, 1, 2]
    assert all(images[i]["video"].shape == (3, 1, 16, 16) for i in range(3))
    mixed = folder(media, "mixed")
    assert mixed.video_indices == [0, 1] and mixed.image_indices == [2, 3]
    assert mixed[0]["video"].shape == (3, 4, 16, 16) and mixed[2]["video"].shape == (3, 1, 16, 16)


def test_bad_files_are_skipped_once_each_and_replaced_deterministically(media):
    ds = folder(media, "bad")
    scan = ds.take_skips()  # at start: the files that cannot be probed or are too short
    assert {(e.path.split("/")[-1], e.reason) for e in scan} == {
        ("truncated.mp4", "unreadable"),
        ("notes.mp4", "unreadable"),
        ("short.mp4", "too_short"),
    }
    zeroed = [e.path.name for e in ds.entries].index("zeroed.mp4")
    item = ds.item(zeroed, 0)  # corrupt while decoding: the next video stands in
    assert torch.equal(item["video"], ds.item((zeroed + 1) % len(ds), 0)["video"])
    loaded = ds.take_skips()
    assert {(e.path.split("/")[-1], e.reason) for e in loaded} == {("zeroed.mp4", "corrupt")}
    log = SkipLog(warn=None)
    log.add(scan + loaded + loaded)
    assert log.counts() == {"unreadable": 2, "corrupt": 1, "too_short": 1}
    assert log.summary() == "4 files skipped: 2 unreadable, 1 corrupt, 1 too_short"


def test_a_folder_without_usable_files_fails_naming_it(media, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.mp4").write_text("nope")
    with pytest.raises(EflowError, match=f"no usable file in {tmp_path / 'broken'}.*unreadable"):
        VideoFolderDataset(4, 16, 16, root=str(tmp_path / "broken"))
    with pytest.raises(EflowError, match="no such folder"):
        VideoFolderDataset(4, 16, 16, root=str(tmp_path / "missing"))
    with pytest.raises(EflowError, match=r"no usable file.*too_short"):
        folder(media, "good", frames=40)
    (tmp_path / "both" / "cls").mkdir(parents=True)
    for target in (tmp_path / "both" / "x.png", tmp_path / "both" / "cls" / "y.png"):
        target.write_bytes((media / "images" / "img0.png").read_bytes())
    with pytest.raises(EflowError, match="layout = 'classes'"):
        VideoFolderDataset(1, 16, 16, root=str(tmp_path / "both"))
    assert len(VideoFolderDataset(1, 16, 16, root=str(tmp_path / "both"), layout="flat")) == 2


def test_the_scan_is_cached_and_refreshed_when_a_file_changes(media, tmp_path, monkeypatch):
    cache = tmp_path / "scan.json"
    folder(media, "good", scan_cache=str(cache))
    assert len(json.loads(cache.read_text())["files"]) == 4
    calls = []
    original = media_scan.probe
    monkeypatch.setattr(media_scan, "probe", lambda path: calls.append(path) or original(path))
    folder(media, "good", scan_cache=str(cache))
    assert calls == []  # nothing probed again
    data = json.loads(cache.read_text())
    key = str((media / "good" / "run" / "c.mp4").resolve())
    data["files"][key]["stamp"][1] -= 1  # as if the file had changed since
    cache.write_text(json.dumps(data))
    folder(media, "good", scan_cache=str(cache))
    assert [p.name for p in calls] == ["c.mp4"]


# ----- captions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["clips.jsonl", "clips.csv"])
def test_captions_manifest_rows(media, manifest):
    ds = CaptionsDataset(3, 16, 16, root=str(media / "captions" / manifest), reader="pyav")
    assert len(ds) == 4 and ds.image_indices == [3]
    assert [ds.caption(i) for i in range(4)][::3] == ["a box slides right", "a still picture"]
    assert ds.entries[1].fps == 10 and (ds.entries[2].start, ds.entries[2].end) == (0.0, 0.25)
    assert ds[0]["video"].shape == (3, 3, 16, 16) and ds[3]["video"].shape == (3, 1, 16, 16)
    assert ds[0]["caption"] == "a box slides right" and "label" not in ds[0]
    segment = ds.item(2, 4)["video"][0, :, -4:].float().mean(dim=(1, 2)).numpy()
    assert segment.max() < FRAME_RED(6)  # inside [0, 0.25) s = frames 0..5


def test_captions_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4"}\n')
    with pytest.raises(EflowError, match=r"(?s)m.jsonl:2.*caption: Field required"):
        CaptionsDataset(2, 8, 8, root=str(bad))
    csv = tmp_path / "m.csv"
    csv.write_text("file,text\na.mp4,x\n")
    with pytest.raises(EflowError, match="lacks caption, path"):
        CaptionsDataset(2, 8, 8, root=str(csv))
    with pytest.raises(EflowError, match=r"\.jsonl or \.csv"):
        CaptionsDataset(2, 8, 8, root=str(tmp_path / "m.txt"))


def test_registered_options_reject_typos(media):
    registry = get_registry("dataset")
    with pytest.raises(ConfigError, match="strde"):
        registry.create("video-folder", 4, 16, 16, options={"root": str(media / "good"), "strde": 2})
    with pytest.raises(ConfigError, match="root"):
        registry.create("captions", 4, 16, 16, options={})


# ----- through `eflow train` --------------------------------------------------------------------------

runner = CliRunner()
TINY = ["--frames", 4, "--size", 16, "--batch-size", 2, "--steps", 2, "--device", "cpu", "--reader", "pyav"]
TINY += ["--preset", "tiny", "--threads", 1, "--set", "train.preview_every=0", "--set", "train.save_every=0"]


def train(*args):
    result = runner.invoke(app, ["train", *[str(a) for a in args]])
    return result


def test_train_on_a_video_folder_with_workers_and_labels(media, tmp_path):
    out = tmp_path / "vf"
    result = train(
        "--data", "video-folder", "--data-root", media / "good", "--workers", 2, "--out", out, *TINY
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "labels.json").read_text()) == {"classes": ["jump", "run"]}
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["options"]["root"] == str(media / "good") and config["data"]["num_classes"] == 2
    assert config["train"]["workers"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


def test_train_on_captions_with_images_mixed_in(media, tmp_path):
    out = tmp_path / "cap"
    result = train(
        "--data", "captions", "--data-root", media / "captions" / "clips.jsonl", "--condition", "text",
        "--image-ratio", 0.5, "--workers", 0, "--out", out, *TINY,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_train_skips_bad_files_counts_them_and_keeps_going(media, tmp_path):
    out = tmp_path / "bad"
    result = train("--data", "video-folder", "--data-root", media / "bad", "--out", out, *TINY, "--steps", 4)
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 4
    assert records[0]["skipped/unreadable"] == 2 and records[0]["skipped/too_short"] == 1
    last = records[-1]
    assert {k: v for k, v in last.items() if k.startswith("skipped/")} == {
        "skipped/unreadable": 2,
        "skipped/too_short": 1,
        "skipped/corrupt": 1,  # zeroed.mp4, found when a step first drew it
    }
    for name in ("truncated.mp4", "notes.mp4", "short.mp4", "zeroed.mp4"):
        assert result.output.count(f"{name} (") == 1, result.output  # one warning each
    assert "4 files skipped: 2 unreadable, 1 corrupt, 1 too_short" in result.output
    resumed = train(
        "--data", "video-folder", "--data-root", media / "bad", "--out", out, *TINY, "--steps", 5, "--resume"
    )
    assert resumed.exit_code == 0, resumed.output
    assert "skipping" not in resumed.output  # known from the checkpoint: no second warning
    assert {k: v for k, v in read_metrics(out / "metrics.jsonl")[-1].items() if k.startswith("skipped/")} == {
        k: v for k, v in last.items() if k.startswith("skipped/")
    }


def test_train_errors_for_bad_data_flags(media, tmp_path):
    result = train("--data", "video-folder", "--data-root", tmp_path / "none", "--out", tmp_path / "x", *TINY)
    assert result.exit_code == 2 and "no such folder" in result.output and "Traceback" not in result.output
    result = train(
        "--data", "video-folder", "--data-root", media / "good", "--image-ratio", 0.2, "--out", tmp_path / "z", *TINY
    )  # fmt: skip
    assert result.exit_code == 2 and "holds no images" in result.output
    result = train("--data-root", media / "good", "--out", tmp_path / "y", *TINY)  # shapes takes no root
    assert result.exit_code == 2 and "root" in result.output
