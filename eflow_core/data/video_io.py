"""Video writers (mp4 via PyAV, gif via Pillow, PNG frame grids) and an mp4 reader; all writes atomic.

Input convention, decided by dtype: a floating tensor/array is a clip [C, T, H, W] (or a batch
[B, C, T, H, W]) in [-1, 1]; a uint8 array is frames [T, H, W, C] (or [B, T, H, W, C]). C is 1 or 3.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from eflow.atomic import atomic_path

MIN_VIDEO_SIZE = 128  # small clips are upscaled (nearest neighbour) until their short side is at least this
MIN_CELL_SIZE = 64  # same for a frame in a PNG grid
GUTTER = 2  # white pixels between (and around) the cells of a grid


def to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[C, T, H, W] float in [-1, 1] -> [T, H, W, C] uint8 (also [B, C, T, H, W] -> [B, T, H, W, C])."""
    x = (
        video.detach().float().cpu().numpy()
        if isinstance(video, torch.Tensor)
        else np.asarray(video, np.float32)
    )
    x = np.clip((x + 1.0) * 127.5, 0.0, 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(x, -4, -1))


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """to_uint8's inverse on its levels: [B, T, H, W, C] uint8 -> [B, C, T, H, W] float in [-1, 1], which
    to_uint8 maps back to the same bytes."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _rgb_frames(video: torch.Tensor | np.ndarray, batched: bool) -> np.ndarray:
    """Any accepted input -> uint8 RGB [B, T, H, W, 3] (batched) or [T, H, W, 3]."""
    is_uint8 = (
        video.dtype == torch.uint8 if isinstance(video, torch.Tensor) else np.asarray(video).dtype == np.uint8
    )
    if is_uint8:
        frames = video.cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    else:
        frames = to_uint8(video)
    if frames.ndim == 4 and batched:
        frames = frames[None]
    if frames.ndim != (5 if batched else 4) or frames.shape[-1] not in (1, 3):
        layout = (
            "[B, C, T, H, W] float or [B, T, H, W, C] uint8"
            if batched
            else "[C, T, H, W] float or [T, H, W, C] uint8"
        )
        raise ValueError(f"expected video {layout} with C in (1, 3), got shape {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def _auto_scale(height: int, width: int, min_size: int) -> int:
    """Integer upscale factor that brings the short side to at least min_size."""
    return max(1, math.ceil(min_size / max(1, min(height, width))))


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of [..., H, W, C] by an integer factor."""
    if scale == 1:
        return frames
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def _tile(cells: np.ndarray, gutter: int = GUTTER) -> np.ndarray:
    """[R, K, H, W, 3] cells -> one [R*H + (R+1)*g, K*W + (K+1)*g, 3] image with white gutters."""
    rows, cols, h, w, _ = cells.shape
    canvas = np.full((rows * (h + gutter) + gutter, cols * (w + gutter) + gutter, 3), 255, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = gutter + r * (h + gutter), gutter + k * (w + gutter)
            canvas[y : y + h, x : x + w] = cells[r, k]
    return canvas


def write_mp4(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    fps: float = 8,
    scale: int | None = None,
    crf: int = 18,
) -> Path:
    """Write a clip ([C, T, H, W] float in [-1, 1] or [T, H, W, C] uint8) as H.264 mp4; returns the path.

    scale: integer nearest-neighbour upscale; None picks the smallest one making the short side at least
    MIN_VIDEO_SIZE. Odd sizes are edge-padded to even (yuv420p). Falls back to mpeg4 without libx264.
    """
    frames = _rgb_frames(video, batched=False)
    h, w = frames.shape[1:3]
    frames = _upscale(frames, scale if scale is not None else _auto_scale(h, w, MIN_VIDEO_SIZE))
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed frames
    return Path(path)


def write_gif(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    fps: float = 8,
    scale: int | None = None,
) -> Path:
    """Write one clip, or a batch tiled into a near-square grid, as a looping gif; returns the path.

    Accepts [C, T, H, W] / [B, C, T, H, W] float in [-1, 1] or [T, H, W, C] / [B, T, H, W, C] uint8.
    Pillow merges identical consecutive frames into one longer frame.
    """
    batch = _rgb_frames(video, batched=True)  # [B, T, H, W, 3]
    b, t, h, w, _ = batch.shape
    batch = _upscale(batch, scale if scale is not None else _auto_scale(h, w, MIN_VIDEO_SIZE))
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    blank = np.full((rows * cols - b, *batch.shape[1:]), 255, np.uint8)
    grid = np.concatenate([batch, blank]).reshape(rows, cols, *batch.shape[1:])
    frames = [_tile(grid[:, :, i]) if b > 1 else batch[0, i] for i in range(t)]
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
    return Path(path)


def write_grid_png(
    path: str | os.PathLike,
    videos: torch.Tensor | np.ndarray,
    frames: int | None = None,
    scale: int | None = None,
) -> Path:
    """PNG grid of [B, C, T, H, W] in [-1, 1]: one row per video, `frames` evenly spaced columns (<= 8 if None)."""
    batch = _rgb_frames(videos, batched=True)  # [B, T, H, W, 3]
    t, h, w = batch.shape[1:4]
    cols = min(t, frames if frames is not None else 8)
    index = np.linspace(0, t - 1, max(cols, 1)).round().astype(int)
    cells = _upscale(batch[:, index], scale if scale is not None else _auto_scale(h, w, MIN_CELL_SIZE))
    with atomic_path(path) as tmp:
        Image.fromarray(_tile(cells)).save(tmp, format="PNG")
    return Path(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file -> uint8 RGB [T, H, W, 3]."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return np.stack(frames)
