"""Test guards: only the built-in plugins load unless a test asks for more; a fresh host per test."""

import os

import pytest
import torch

os.environ.setdefault("EFLOW_PLUGINS", "")  # never load whatever third-party plugins happen to be installed


@pytest.fixture
def fresh_host(monkeypatch):
    """A plugin host that re-reads entry points and environment variables (restored afterwards)."""
    from eflow.registry import reset_host

    reset_host()
    yield monkeypatch
    reset_host()


@pytest.fixture
def restore_threads():
    """Tests that train set torch's thread count (a loaded 2-core machine stalls on more); restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Scan caches go to a per-test folder, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ----- media fixtures for the video data tests (tiny files written with PyAV, once per session) -------

FRAME_RED = lambda i: 10 + 12 * i  # noqa: E731  the red level of frame i, so tests can tell frames apart


def write_test_video(path, frames, width, height, fps=24, pts_ms=None, faststart=False):
    """An H.264 mp4 of `frames` frames: flat red level FRAME_RED(i) plus a white box moving right.
    pts_ms gives each frame's time in milliseconds (a variable frame rate)."""
    from fractions import Fraction

    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[..., 0] = FRAME_RED(i)
            x = (i * 7) % max(width - 16, 1)
            image[height // 3 : height // 3 + 16, x : x + 16] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_test_image(path, width, height, red):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = red
    image[:, : width // 2, 2] = 200  # left half blue: shows where the centre crop lands
    Image.fromarray(image).save(path)
    return path


VFR_PTS_MS = [0, 20, 80, 100, 160, 180, 240, 260, 320, 340, 400, 420]  # 20 ms / 60 ms alternating


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Folders of tiny test media:
    good/    Kinetics layout: jump/{a.mp4 176x144 12f, vfr.mp4 176x144 12f VFR}, run/{b.mp4 640x272 10f, c.mp4}
    bad/     good/ plus jump/truncated.mp4 (cut: unreadable), run/zeroed.mp4 (payload zeroed: corrupt),
             run/short.mp4 (3 frames: too short for 4-frame clips), run/notes.mp4 (text, not a video)
    images/  flat: three images of odd sizes
    mixed/   flat: two videos and two images
    captions/clips.jsonl and clips.csv: rows pointing at captions/clips/*, one image row, one segment row
    """
    import json
    import shutil

    root = tmp_path_factory.mktemp("media")
    good = root / "good"
    write_test_video(good / "jump" / "a.mp4", 12, 176, 144)
    write_test_video(good / "jump" / "vfr.mp4", 12, 176, 144, pts_ms=VFR_PTS_MS)
    write_test_video(good / "run" / "b.mp4", 10, 640, 272)
    write_test_video(good / "run" / "c.mp4", 8, 176, 144, fps=12)
    bad = root / "bad"
    shutil.copytree(good, bad)
    data = write_test_video(root / "whole.mp4", 12, 176, 144).read_bytes()
    (bad / "jump" / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: lost
    fast = write_test_video(root / "fast.mp4", 12, 176, 144, faststart=True).read_bytes()
    at = fast.find(b"mdat") + 20
    (bad / "run" / "zeroed.mp4").write_bytes(fast[:at] + bytes(len(fast) - at))
    write_test_video(bad / "run" / "short.mp4", 3, 176, 144)
    (bad / "run" / "notes.mp4").write_text("not a video")
    images = root / "images"
    for i, (w, h) in enumerate([(75, 50), (33, 61), (64, 64)]):
        write_test_image(images / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}", w, h, red=40 * (i + 1))
    mixed = root / "mixed"
    mixed.mkdir()
    shutil.copy(good / "jump" / "a.mp4", mixed / "a.mp4")
    shutil.copy(good / "run" / "b.mp4", mixed / "b.mp4")
    shutil.copy(images / "img0.png", mixed / "img0.png")
    shutil.copy(images / "img1.jpg", mixed / "img1.jpg")
    captions = root / "captions"
    (captions / "clips").mkdir(parents=True)
    shutil.copy(good / "jump" / "a.mp4", captions / "clips" / "a.mp4")
    shutil.copy(good / "jump" / "vfr.mp4", captions / "clips" / "vfr.mp4")
    shutil.copy(images / "img0.png", captions / "clips" / "still.png")
    rows = [
        {"path": "clips/a.mp4", "caption": "a box slides right"},
        {"path": "clips/vfr.mp4", "caption": "an uneven box", "fps": 10},
        {"path": "clips/a.mp4", "caption": "the first half", "start": 0.0, "end": 0.25},
        {"path": "clips/still.png", "caption": "a still picture", "id": 7},
    ]
    (captions / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["path,caption,fps,start,end"] + [
        f"{r['path']},{r['caption']},{r.get('fps', '')},{r.get('start', '')},{r.get('end', '')}" for r in rows
    ]
    (captions / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


# ----- the command line in-process, for the CLI tests ---------------------------------------------------
def run_cli(*args, columns: int | None = None):
    """`eflow ARGS...` in-process (arguments str()-ed, so paths and numbers can be passed); the Result.
    `columns`: the terminal width rich wraps at (a wide one leaves tables unwrapped)."""
    from typer.testing import CliRunner

    from eflow.cli.app import app

    env = {"COLUMNS": str(columns)} if columns is not None else None
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def ok(result):
    """`result` of a command that must have succeeded (its output shown when it did not)."""
    assert result.exit_code == 0, result.output
    return result


def assert_clean_error(result, *fragments, unwrap: bool = False):
    """Exit status 2, no traceback, and every fragment in the output (with `unwrap`: in the output with
    its white space folded, as rich wraps long lines)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split()) if unwrap else result.output
    for fragment in fragments:
        assert fragment in text, result.output


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a module's tests (a loaded 2-core machine stalls on more); restored after it.
    A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread_per_module")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
