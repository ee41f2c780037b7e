"""Which frames of a video make one clip: a random temporal window at a frame stride or a target fps.

Both take the frame timestamps t [N] (seconds, ascending; variable frame rates allowed), an optional
segment [start, end) in seconds, and u in [0, 1) (the dataset draws it from (seed, epoch, item), so
the window is a pure function of those).

- stride s: frames i0, i0 + s, ..., i0 + (F - 1) s, with i0 uniform over the positions where the
  window fits inside the segment's frames. Needs (F - 1) s + 1 frames.
- fps r: times tau_j = tau_0 + j / r (j < F), tau_0 uniform in [lo, hi - (F - 1) / r] where lo and hi
  are the first and last frame times inside the segment; frame j is the one on screen at tau_j (the
  last frame whose timestamp is <= tau_j). A file faster than r drops frames, a slower one repeats
  them. Needs hi - lo >= (F - 1) / r.

A window that does not fit raises MediaError("too_short", ...).
"""

from __future__ import annotations

import math

import numpy as np

from eflow.data.skips import MediaError

EPS = 1e-4  # seconds: timestamps from different readers differ by float rounding


def segment_frames(timestamps: np.ndarray, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, last] frame indices whose timestamps lie in [start, end) (whole video when None)."""
    n = len(timestamps)
    first = 0 if start is None else int(np.searchsorted(timestamps, start - EPS, side="left"))
    last = n - 1 if end is None else int(np.searchsorted(timestamps, end - EPS, side="left")) - 1
    return first, min(last, n - 1)


def stride_window(
    timestamps: np.ndarray,
    frames: int,
    stride: int,
    u: float,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """int64 [frames] indices: every `stride`-th frame from a start chosen by u."""
    first, last = segment_frames(timestamps, start, end)
    need = (frames - 1) * stride + 1
    have = last - first + 1
    if have < need:
        raise MediaError(
            "too_short", f"{max(have, 0)} frames, a clip of {frames} at stride {stride} needs {need}"
        )
    i0 = first + min(int(u * (have - need + 1)), have - need)
    return i0 + stride * np.arange(frames, dtype=np.int64)


def fps_window(
    timestamps: np.ndarray,
    frames: int,
    fps: float,
    u: float,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """int64 [frames] indices of the frames on screen at `fps` from a start time chosen by u."""
    first, last = segment_frames(timestamps, start, end)
    span = (frames - 1) / fps
    if last < first or timestamps[last] - timestamps[first] < span - EPS:
        seconds = max(float(timestamps[last] - timestamps[first]), 0.0) if last >= first else 0.0
        raise MediaError(
            "too_short", f"{seconds:.3f} s of frames, a clip of {frames} at {fps:g} fps spans {span:.3f} s"
        )
    lo, hi = float(timestamps[first]), float(timestamps[last])
    tau0 = lo + u * max(hi - lo - span, 0.0)
    times = tau0 + np.arange(frames) / fps
    index = np.searchsorted(timestamps, times + EPS, side="right") - 1
    return np.clip(index, first, last).astype(np.int64)


def window_fits(
    frames_available: int, duration: float, frames: int, stride: int, fps: float | None, seconds: float | None
) -> bool:
    """Cheap check from header facts (before decoding): could a clip fit at all? Files that fail it are
    skipped at the scan; the few that pass it and still do not fit are skipped when loaded.

    `seconds` is the length of a [start, end) segment when one is given (else the whole duration).
    """
    if fps is None:
        if seconds is not None and duration > 0:
            frames_available = min(frames_available, math.ceil(seconds * frames_available / duration))
        return frames_available >= (frames - 1) * stride + 1
    length = min(duration, seconds) if seconds is not None else duration
    return length >= (frames - 1) / fps - EPS  # lenient by one frame: loading decides the edge cases
