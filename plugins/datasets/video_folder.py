"""Dataset `video-folder`: clips from a folder of videos (and images), labelled by subfolder.

Layouts (option `layout`, default auto-detected):
  classes  root/<class>/**/<file>: one subfolder per class, Kinetics style. Labels are the subfolder
           names sorted, numbered 0..n-1; files directly in root are ignored.
  flat     root/**/<file>: every file below root, one class (label 0) named after the folder, so
           class-conditional training on it is unconditional in effect.
  auto     classes if root holds subfolders with media and no media files of its own, flat if it
           holds only files; both is an error asking to choose.
Videos are .mp4 .m4v .mov .mkv .webm .avi; images (.png .jpg .jpeg .webp .bmp) are one-frame clips,
mixed into training at `data.image_ratio`. Hidden files and folders (".name") are ignored.

Each item: a random temporal window of `frames` at `stride` or at a target `fps` (from the file's
timestamps), short-side resized and centre-cropped to (height, width): {"video": float32 [3, T, H, W]
in [-1, 1], "label": int}. `classes` holds the label names (the trainer saves them as labels.json in
the run directory). Bad files are skipped (see eflow_core/data/clip_dataset.py and skips.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from eflow.api import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ClipDataset, EflowError, MediaEntry, hookimpl

MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES


class VideoFolderOptions(BaseModel):
    """Options of the `video-folder` dataset (frames, size and seed come from the run)."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="the folder (--data-root): class subfolders or a flat folder of clips")
    layout: Literal["auto", "classes", "flat"] = Field(
        "auto", description="classes: one subfolder per class; flat: no labels; auto: detect"
    )
    stride: int = Field(1, ge=1, description="take every n-th frame (ignored when fps is set)")
    fps: float | None = Field(None, gt=0, description="sample frames at this rate from the timestamps")
    reader: Literal["auto", "pyav", "decord"] = Field(
        "auto", description="video decoder: decord when installed (auto), or force pyav / decord"
    )
    scan_cache: str | None = Field(
        None, description="JSON file caching the header scan; default $XDG_CACHE_HOME/eflow/scans/"
    )


def _media_files(folder: Path, recursive: bool) -> list[Path]:
    """Media files in `folder` (sorted, hidden ones skipped)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in MEDIA_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_media(root: Path, layout: str) -> tuple[list[MediaEntry], list[str]]:
    """(entries, class names) of a folder in the given layout."""
    if not root.is_dir():
        raise EflowError(f"--data-root {root}: no such folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _media_files(d, recursive=True) for d in subdirs}
    class_files = {name: files for name, files in class_files.items() if files}
    top = _media_files(root, recursive=False)
    if layout == "auto":
        if class_files and top:
            raise EflowError(
                f"{root} holds media files at its top level and in subfolders; set the dataset option "
                "layout = 'classes' (subfolders are classes, top-level files ignored) or 'flat' (every file, no labels)"
            )
        layout = "classes" if class_files else "flat"
    if layout == "classes":
        classes = sorted(class_files)
        entries = [MediaEntry(p, label=i) for i, name in enumerate(classes) for p in class_files[name]]
    else:
        classes = [root.resolve().name or "all"]
        entries = [MediaEntry(p, label=0) for p in _media_files(root, recursive=True)]
    if not entries:
        raise EflowError(
            f"{root} holds no video or image files ({' '.join(MEDIA_SUFFIXES)}) in the {layout} layout"
        )
    return entries, classes


class VideoFolderDataset(ClipDataset):
    """Map-style: item i -> {"video": float32 [3, T, H, W] in [-1, 1], "label": int}."""

    def __init__(
        self,
        frames: int,
        height: int,
        width: int,
        *,
        root: str,
        seed: int = 0,
        layout: str = "auto",
        stride: int = 1,
        fps: float | None = None,
        reader: str = "auto",
        scan_cache: str | None = None,
    ):
        entries, self.classes = list_media(Path(root), layout)
        self.num_classes = len(self.classes)
        super().__init__(
            entries,
            frames,
            height,
            width,
            seed=seed,
            source=str(root),
            reader=reader,
            stride=stride,
            fps=fps,
            scan_cache=scan_cache,
        )


@hookimpl
def register_datasets(register):
    register(
        "video-folder",
        VideoFolderDataset,
        summary="clips from a folder of videos/images: class subfolders (Kinetics layout) or flat",
        options=VideoFolderOptions,
    )
