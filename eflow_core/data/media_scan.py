"""The start-up scan: probe every media file's header once and cache the results.

probe(path) reads only the container header (PyAV, never decord, so it is safe before DataLoader
workers fork) or the image header (Pillow): kind, size, frame count, duration and mean frame rate.
When a container does not state its frame count, it is estimated as round(duration * rate); the
readers count the real frames (and catch files whose header lies) when loading.

scan(paths, cache_file) probes every path, reusing cached results for files whose size and
modification time are unchanged, and rewrites the cache (atomically) when anything new was probed.
The cache is a JSON file; by default one per dataset root under $XDG_CACHE_HOME/eflow/scans/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from eflow.atomic import atomic_write_text
from eflow.data.readers import IMAGE_SUFFIXES
from eflow.data.skips import MediaError

SCAN_VERSION = 1


@dataclass(frozen=True)
class MediaInfo:
    """Header facts of one file. Images: frames = 1, duration = 0, fps = 0."""

    kind: str  # "video" or "image"
    width: int
    height: int
    frames: int
    duration: float  # seconds
    fps: float  # mean frame rate


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def probe(path: str | os.PathLike) -> MediaInfo:
    """Header facts of a video or image file; MediaError("unreadable", ...) if it cannot be probed."""
    if is_image(path):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise MediaError("unreadable", f"cannot read the image header: {err}") from None
        return MediaInfo("image", width, height, 1, 0.0, 0.0)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("unreadable", "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 0
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = stream.frames or round(duration * float(rate))
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise MediaError("unreadable", f"cannot open: {err}") from None
    if frames < 1 or width < 1 or height < 1:
        raise MediaError("unreadable", f"the header gives {frames} frames of {width}x{height}")
    return MediaInfo("video", width, height, int(frames), duration, float(rate))


def default_cache_file(root: str | os.PathLike) -> Path:
    """$XDG_CACHE_HOME/eflow/scans/<hash of the absolute root>.json (XDG default ~/.cache)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return base / "eflow" / "scans" / f"{key}.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def scan(paths: list[Path], cache_file: Path | None) -> dict[Path, MediaInfo | MediaError]:
    """Probe every path (cached by size and mtime): MediaInfo, or the MediaError that probing raised."""
    cached: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("version") == SCAN_VERSION:
                cached = data.get("files", {})
        except (OSError, json.JSONDecodeError):
            cached = {}
    results: dict[Path, MediaInfo | MediaError] = {}
    entries: dict[str, dict] = {}
    changed = False
    for path in paths:
        key = str(path.resolve())
        try:
            stamp = _stamp(path)
        except OSError as err:
            results[path] = MediaError("unreadable", f"cannot stat: {err.strerror or err}")
            continue
        entry = cached.get(key)
        if entry is None or entry.get("stamp") != stamp:
            changed = True
            try:
                entry = {"stamp": stamp, "info": asdict(probe(path))}
            except MediaError as err:
                entry = {"stamp": stamp, "error": [err.reason, err.detail]}
        entries[key] = entry
        results[path] = MediaInfo(**entry["info"]) if "info" in entry else MediaError(*entry["error"])
    if cache_file is not None and (changed or set(entries) != set(cached)):
        with contextlib.suppress(OSError):  # a read-only cache location only costs a re-scan next time
            atomic_write_text(cache_file, json.dumps({"version": SCAN_VERSION, "files": entries}))
    return results
