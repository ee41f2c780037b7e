"""Dataset `captions`: captioned clips listed in a JSONL or CSV manifest.

The manifest (`root`, i.e. --data-root) is a .jsonl file (one JSON object a line) or a .csv file with a
header row. Fields of a row:
  path     the video or image file, relative to the manifest's folder (or absolute)     required
  caption  the text                                                                    required
  fps      sample this row's frames at this rate (overrides the dataset option)        optional
  start    first second of the segment to take clips from                              optional
  end      end (exclusive) second of the segment                                       optional
Other fields are ignored; empty CSV cells count as missing. A row whose path is an image is a
one-frame clip. A malformed row is an error naming the manifest line and field.

Each item: {"video": float32 [3, T, H, W] in [-1, 1], "caption": str}, the window chosen as in
`video-folder` (random window of `frames` at `stride` or `fps`, inside [start, end) when given).
Bad files are skipped (see eflow_core/data/clip_dataset.py and skips.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eflow.api import ClipDataset, EflowError, MediaEntry, format_validation_error, hookimpl, read_utf8


class CaptionsOptions(BaseModel):
    """Options of the `captions` dataset (frames, size and seed come from the run)."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="the manifest (--data-root): a .jsonl or .csv file")
    stride: int = Field(1, ge=1, description="take every n-th frame (ignored when fps is set)")
    fps: float | None = Field(None, gt=0, description="sample frames at this rate from the timestamps")
    reader: Literal["auto", "pyav", "decord"] = Field(
        "auto", description="video decoder: decord when installed (auto), or force pyav / decord"
    )
    scan_cache: str | None = Field(
        None, description="JSON file caching the header scan; default $XDG_CACHE_HOME/eflow/scans/"
    )


class ManifestRow(BaseModel):
    """One manifest row."""

    model_config = ConfigDict(extra="ignore")

    path: str = Field(min_length=1)
    caption: str
    fps: float | None = Field(None, gt=0)
    start: float | None = Field(None, ge=0)
    end: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _segment(self) -> ManifestRow:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


def _raw_rows(manifest: Path) -> list[tuple[int, dict]]:
    """(line number, raw fields) of every row."""
    suffix = manifest.suffix.lower()
    text = read_utf8(manifest)
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise EflowError(f"{manifest}:{number}: not valid JSON: {err.msg}") from None
            if not isinstance(value, dict):
                raise EflowError(f"{manifest}:{number}: expected a JSON object with path and caption")
            rows.append((number, value))
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"path", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise EflowError(
                f"{manifest}: the CSV header lacks {', '.join(sorted(missing))} (got {reader.fieldnames})"
            )
        return [
            (number, {k: v for k, v in row.items() if k is not None and v not in ("", None)})
            for number, row in enumerate(reader, start=2)
        ]
    raise EflowError(f"--data-root {manifest}: a captions manifest must be .jsonl or .csv")


def read_manifest(manifest: Path) -> list[MediaEntry]:
    """Entries of a manifest, paths resolved against its folder."""
    if not manifest.is_file():
        raise EflowError(f"--data-root {manifest}: no such manifest file (.jsonl or .csv)")
    entries = []
    for number, raw in _raw_rows(manifest):
        try:
            row = ManifestRow.model_validate(raw)
        except ValidationError as err:
            raise EflowError(format_validation_error(err, f"{manifest}:{number}")) from None
        path = Path(row.path)
        entries.append(
            MediaEntry(
                path if path.is_absolute() else manifest.parent / path,
                caption=row.caption,
                fps=row.fps,
                start=row.start,
                end=row.end,
            )
        )
    if not entries:
        raise EflowError(f"{manifest} lists no clips")
    return entries


class CaptionsDataset(ClipDataset):
    """Map-style: item i -> {"video": float32 [3, T, H, W] in [-1, 1], "caption": str}."""

    def __init__(
        self,
        frames: int,
        height: int,
        width: int,
        *,
        root: str,
        seed: int = 0,
        stride: int = 1,
        fps: float | None = None,
        reader: str = "auto",
        scan_cache: str | None = None,
    ):
        super().__init__(
            read_manifest(Path(root)),
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
        "captions",
        CaptionsDataset,
        summary="captioned clips (videos or images) from a JSONL or CSV manifest",
        options=CaptionsOptions,
        labels=False,  # captions only: runs on it are text-conditioned
    )
