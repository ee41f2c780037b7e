"""Video readers behind one small interface: PyAV (always installed) and decord (optional, faster).

    reader = make_reader("auto")              # decord when installed, else PyAV
    with reader.open(path) as video:          # raises MediaError("unreadable", ...) if it cannot open
        video.timestamps                      # float64 [N] seconds of each frame from the first, ascending
        frames = video.frames([0, 4, 8])      # uint8 [T, H, W, 3] RGB; MediaError("corrupt", ...) on failure

A decoder lives only inside one `open` call, so none exists before DataLoader workers fork (decord
deadlocks or returns corrupt frames when its readers are created before the fork), and decord itself
is imported on first use, in the process that reads. Frame i is the i-th frame in presentation order;
its timestamp comes from the container (so variable-frame-rate files are timed correctly). Both
readers decode with one thread: the loader parallelizes over worker processes instead.

Images (PNG, JPEG, ...) are read with Pillow as one-frame clips: read_image(path) -> uint8 [1, H, W, 3].
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError

from eflow.data.skips import MediaError
from eflow.errors import ConfigError

READERS = ("auto", "pyav", "decord")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
PTS_CACHE_SIZE = 4096  # files whose frame timestamps a PyAV reader keeps


class OpenVideo(ABC):
    """An opened video file: frame timestamps and frames by index. Close it (or use `with`)."""

    timestamps: np.ndarray  # float64 [N] seconds from the first frame, ascending

    def __len__(self) -> int:
        return len(self.timestamps)

    @abstractmethod
    def frames(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 [T, H, W, 3] RGB frames at `indices` (presentation order; repeats allowed)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> OpenVideo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, indices: Sequence[int]) -> list[int]:
        idx = [int(i) for i in indices]
        if not idx or min(idx) < 0 or max(idx) >= len(self):
            raise IndexError(f"frame indices {idx} out of range for a video of {len(self)} frames")
        return idx


class VideoReader(ABC):
    """Opens video files; `name` is what `--reader` calls it."""

    name: ClassVar[str]

    @abstractmethod
    def open(self, path: str | os.PathLike) -> OpenVideo: ...


# ----- PyAV ------------------------------------------------------------------------------------------------


class _PyAVVideo(OpenVideo):
    def __init__(self, path: str, pts_cache: OrderedDict | None = None):
        self.path = path
        try:
            self.container = av.open(path)
        except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise MediaError("unreadable", f"cannot open: {err}") from None
        try:
            if not self.container.streams.video:
                raise MediaError("unreadable", "no video stream")
            self.stream = self.container.streams.video[0]
            self.stream.thread_count = 1
            self._pts = self._cached_pts(pts_cache)
        except BaseException:
            self.container.close()
            raise
        self.timestamps = (self._pts - self._pts[0]).astype(np.float64) * float(self.stream.time_base)
        self._to_rgb = VideoReformatter()

    def _cached_pts(self, cache: OrderedDict | None) -> np.ndarray:
        """The frame timestamps, from the reader's cache when this file (same size and mtime) was seen."""
        if cache is None:
            return self._packet_pts()
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise MediaError("unreadable", f"cannot stat: {err.strerror or err}") from None
        key = (self.path, st.st_size, st.st_mtime_ns)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        pts = cache[key] = self._packet_pts()
        if len(cache) > PTS_CACHE_SIZE:
            cache.popitem(last=False)
        return pts

    def _packet_pts(self) -> np.ndarray:
        """Presentation timestamps of every frame, from demuxing (no decoding), ascending."""
        try:
            pts = [p.pts for p in self.container.demux(self.stream) if p.pts is not None and p.size > 0]
        except av.FFmpegError as err:
            raise MediaError("corrupt", f"demuxing failed: {err}") from None
        if not pts:
            raise MediaError("corrupt", "no frames")
        header = self.stream.frames
        if header and len(pts) < header:
            raise MediaError("corrupt", f"the header promises {header} frames but the file holds {len(pts)}")
        return np.unique(np.asarray(pts, dtype=np.int64))

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = self._check(indices)
        wanted = {int(self._pts[i]) for i in idx}
        last = max(wanted)
        got: dict[int, np.ndarray] = {}
        try:
            self.container.seek(min(wanted), stream=self.stream, backward=True, any_frame=False)
            for frame in self.container.decode(self.stream):
                if frame.pts in wanted:  # one converter for all frames: a new one per frame costs more
                    got[frame.pts] = self._to_rgb.reformat(frame, format="rgb24").to_ndarray()
                if frame.pts is not None and frame.pts >= last:
                    break
        except av.FFmpegError as err:
            raise MediaError("corrupt", f"decoding failed: {err}") from None
        if len(got) < len(wanted):
            raise MediaError("corrupt", f"decoded {len(got)} of {len(wanted)} requested frames")
        return _stack([got[int(self._pts[i])] for i in idx])

    def close(self) -> None:
        self.container.close()


class PyAVReader(VideoReader):
    """PyAV (bundled FFmpeg): installs everywhere; seeks to the keyframe before the window and decodes.

    The frame timestamps come from demuxing the whole file (no decoding); they are kept for the last
    PTS_CACHE_SIZE files opened, so a long video read again for another window is not demuxed again.
    """

    name = "pyav"

    def __init__(self):
        self._pts_cache: OrderedDict = OrderedDict()

    def open(self, path: str | os.PathLike) -> OpenVideo:
        return _PyAVVideo(str(path), self._pts_cache)


# ----- decord ----------------------------------------------------------------------------------------------


def _import_decord():
    """decord, imported on first use in the reading process, with FFmpeg's own logging silenced (a bad
    file is reported once, by the dataset, instead of once per broken packet)."""
    import decord

    if not getattr(decord, "_eflow_quiet", False):
        decord.logging.set_level(decord.logging.FATAL)
        decord._eflow_quiet = True
    return decord


class _DecordVideo(OpenVideo):
    def __init__(self, path: str):
        decord = _import_decord()
        try:
            self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            n = len(self.reader)
            if n == 0:
                raise MediaError("corrupt", "no frames")
            self.timestamps = self.reader.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
        except (RuntimeError, decord.DECORDError) as err:
            raise MediaError("unreadable", f"decord cannot open it: {_first_line(err)}") from None
        self.timestamps -= self.timestamps[0]
        self._error = decord.DECORDError

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = self._check(indices)
        try:
            out = self.reader.get_batch(idx).asnumpy()
        except (RuntimeError, self._error) as err:
            raise MediaError("corrupt", f"decoding failed: {_first_line(err)}") from None
        return _stack(list(out))

    def close(self) -> None:
        del self.reader


class DecordReader(VideoReader):
    """decord: random access by frame index; optional (`pip install 'eflow[video]'`)."""

    name = "decord"

    def open(self, path: str | os.PathLike) -> OpenVideo:
        return _DecordVideo(str(path))


# ----- choosing one ----------------------------------------------------------------------------------------


def decord_available() -> bool:
    """Whether decord is installed (checked without importing it)."""
    return importlib.util.find_spec("decord") is not None


def make_reader(name: str = "auto") -> VideoReader:
    """`auto` (decord if installed, else PyAV), `pyav` or `decord` (an error if not installed)."""
    if name not in READERS:
        raise ConfigError(f"reader {name!r} is not one of: {', '.join(READERS)}")
    if name == "decord" and not decord_available():
        raise ConfigError(
            "--reader decord: decord is not installed; `pip install 'eflow[video]'` or use --reader pyav"
        )
    if name == "decord" or (name == "auto" and decord_available()):
        return DecordReader()
    return PyAVReader()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as a one-frame clip: uint8 [1, H, W, 3] RGB."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MediaError("unreadable", f"cannot read the image: {err}") from None


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError("corrupt", f"frames of different sizes: {sorted(shapes)}")
    return np.stack(frames)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
