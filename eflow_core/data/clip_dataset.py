"""ClipDataset: the map-style dataset behind `video-folder` and `captions`, over a list of media files.

    item = dataset.item(i, epoch)   # {"video": uint8 [3, T, H, W], "label"?: int, "caption"?: str}
    dataset[i]                      # the same at epoch 0 with "video" as float32 in [-1, 1]

At construction (main process) every file is probed once (cached, see media_scan): files that cannot be
probed and videos too short for a clip are left out, each recorded as a skip event; a dataset left with
no usable file raises EflowError naming the source. Images are one-frame clips [3, 1, H, W]; their
indices are `image_indices` (the loader batches them separately, see batches.py).

Item i at epoch e takes its temporal window from u ~ U[0, 1) drawn from (seed, e, i) (clip_window),
decodes those frames with the reader (created lazily, in the process that reads: a DataLoader worker),
and resizes + centre-crops them (resize_crop). `item` keeps the pixels as uint8 (the loader ships them
between processes and to the device at a quarter of float32's size; the trainer maps them to [-1, 1]
exactly as `dataset[i]` does). When a file fails while loading (corrupt, or shorter
than its header said), the failure is recorded as a skip event and the next index of the same kind
(video or image) is tried, then the next, so the replacement is a pure function of (seed, e, i) too.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from eflow.data.clip_window import fps_window, stride_window, window_fits
from eflow.data.media_scan import MediaInfo, default_cache_file, scan
from eflow.data.readers import VideoReader, make_reader, read_image
from eflow.data.resize_crop import resize_center_crop, to_signed
from eflow.data.skips import MediaError, SkipEvent
from eflow.errors import EflowError

SEED_MASK = 2**63 - 1


@dataclass(frozen=True)
class MediaEntry:
    """One file (or one [start, end) segment of it) with its condition and optional target fps."""

    path: Path
    label: int | None = None
    caption: str | None = None
    fps: float | None = None  # target fps for this entry (overrides the dataset's)
    start: float | None = None  # seconds
    end: float | None = None

    @property
    def name(self) -> str:
        """The path, plus the segment when there is one (what skip warnings name)."""
        if self.start is None and self.end is None:
            return str(self.path)
        return f"{self.path} [{self.start or 0:g}s, {'end' if self.end is None else f'{self.end:g}s'})"


class ClipDataset(Dataset):
    """Clips of `frames` x `height` x `width` from media files; see the module docstring."""

    reads_files = True  # the loader uses worker processes for it by default

    def __init__(
        self,
        entries: list[MediaEntry],
        frames: int,
        height: int,
        width: int,
        *,
        seed: int,
        source: str,
        reader: str = "auto",
        stride: int = 1,
        fps: float | None = None,
        scan_cache: str | None = None,
    ):
        if min(frames, height, width) < 1 or stride < 1 or (fps is not None and fps <= 0):
            raise ValueError(f"bad clip geometry: {frames}x{height}x{width}, stride {stride}, fps {fps}")
        make_reader(reader)  # checks the name (and that decord is installed) without creating a decoder
        self.frames, self.height, self.width = frames, height, width
        self.seed, self.source, self.reader_name = seed, source, reader
        self.stride, self.fps = stride, fps
        self._reader: VideoReader | None = None
        self._pending: list[SkipEvent] = []
        cache = Path(scan_cache) if scan_cache else default_cache_file(source)
        infos = scan(sorted({e.path for e in entries}), cache)
        kept: list[tuple[MediaEntry, MediaInfo]] = []
        for entry in entries:
            info = infos[entry.path]
            if isinstance(info, MediaError):
                self._record(entry, info)
            elif info.kind == "video" and not self._fits(entry, info):
                self._record(entry, MediaError("too_short", self._too_short_detail(entry, info)))
            else:
                kept.append((entry, info))
        if not kept:
            reasons = sorted({e.reason for e in self._pending})
            raise EflowError(
                f"no usable file in {source}: {len(entries)} entries, all skipped "
                f"({', '.join(reasons) or 'none found'}); check the files and the clip settings "
                f"(frames={frames}, stride={stride}, fps={fps})"
            )
        self.entries = [e for e, _ in kept]
        self.infos = [i for _, i in kept]
        self.image_indices = [i for i, info in enumerate(self.infos) if info.kind == "image"]
        self.video_indices = [i for i, info in enumerate(self.infos) if info.kind == "video"]

    # ----- geometry checks -------------------------------------------------------------------------
    def _fits(self, entry: MediaEntry, info: MediaInfo) -> bool:
        seconds = None
        if entry.start is not None or entry.end is not None:
            seconds = (info.duration if entry.end is None else entry.end) - (entry.start or 0.0)
        return window_fits(
            info.frames, info.duration, self.frames, self.stride, entry.fps or self.fps, seconds
        )

    def _too_short_detail(self, entry: MediaEntry, info: MediaInfo) -> str:
        fps = entry.fps or self.fps
        if fps is not None:
            span = (self.frames - 1) / fps
            return f"{info.duration:.3f} s, a clip of {self.frames} frames at {fps:g} fps spans {span:.3f} s"
        return (
            f"{info.frames} frames, a clip of {self.frames} at stride {self.stride} "
            f"needs {(self.frames - 1) * self.stride + 1}"
        )

    # ----- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        """Item `index` at epoch 0: {"video": float32 [3, T, H, W] in [-1, 1], ...}."""
        item = self.item(index, 0)
        return {**item, "video": to_signed(item["video"])}

    @property
    def reader(self) -> VideoReader:
        if self._reader is None:
            self._reader = make_reader(self.reader_name)
        return self._reader

    def item(self, index: int, epoch: int) -> dict:
        """Item `index` at `epoch` (its window depends on both), "video" as uint8 [3, T, H, W]; a failing
        file is replaced by the next one of the same kind."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} clips")
        index %= n
        pool = self.image_indices if self.infos[index].kind == "image" else self.video_indices
        at = bisect.bisect_left(pool, index)
        for k in range(len(pool)):
            j = pool[(at + k) % len(pool)]
            try:
                return self._load(j, epoch)
            except MediaError as err:
                self._record(self.entries[j], err)
            except (OSError, ValueError, RuntimeError) as err:  # whatever else a broken file provokes
                self._record(self.entries[j], MediaError("corrupt", f"{type(err).__name__}: {err}"))
        kind = self.infos[index].kind
        raise EflowError(f"no {kind} in {self.source} could be decoded ({len(pool)} tried); see the warnings")

    def _load(self, j: int, epoch: int) -> dict:
        entry, info = self.entries[j], self.infos[j]
        u = float(np.random.default_rng([self.seed & SEED_MASK, epoch, j]).random())
        if info.kind == "image":
            frames = read_image(entry.path)
        else:
            fps = entry.fps or self.fps
            with self.reader.open(entry.path) as video:
                if fps is not None:
                    index = fps_window(video.timestamps, self.frames, fps, u, entry.start, entry.end)
                else:
                    index = stride_window(
                        video.timestamps, self.frames, self.stride, u, entry.start, entry.end
                    )
                frames = video.frames(index)
        item = {"video": resize_center_crop(frames, self.height, self.width)}
        if entry.label is not None:
            item["label"] = entry.label
        if entry.caption is not None:
            item["caption"] = entry.caption
        return item

    def caption(self, index: int) -> str:
        """The caption of item `index` without decoding anything."""
        caption = self.entries[index].caption
        if caption is None:
            raise EflowError(f"the dataset from {self.source} has no captions; use --condition label")
        return caption

    # ----- skips ------------------------------------------------------------------------------------
    def _record(self, entry: MediaEntry, err: MediaError) -> None:
        self._pending.append(SkipEvent(entry.name, err.reason, err.detail))

    def take_skips(self) -> list[SkipEvent]:
        """Skip events recorded in this process since the last call (scan-time ones included)."""
        events, self._pending = self._pending, []
        return events
