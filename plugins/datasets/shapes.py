"""Dataset `shapes`: procedurally generated class-conditional clips of one bright shape moving on a dark background.

The class is the MOTION (moving left/right/up/down, bouncing, rotating, growing, shrinking, orbiting,
standing still); colour, shape, size, speed and start position/phase are random per clip, so a model
has to learn the motion to match the label. Each motion spans the whole clip whatever the number of
frames, and shapes stay inside the frame. Item i is a pure function of (seed, i): rendering uses a
local numpy Generator seeded from (seed, i), never global RNG. Shapes are signed-distance fields with
an anti-aliased edge, rendered for all frames at once (about 0.2 ms for 8x32x32).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset

from eflow.api import ConfigError, hookimpl

CLASSES = ("left", "right", "up", "down", "bounce", "rotate", "grow", "shrink", "orbit", "still")
NUM_CLASSES = len(CLASSES)
MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bounce": "bouncing",
    "rotate": "rotating",
    "grow": "growing",
    "shrink": "shrinking",
    "orbit": "orbiting",
    "still": "standing still",
}
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # bright RGB in [0, 1]
    "red": (1.0, 0.18, 0.15),
    "green": (0.2, 0.9, 0.25),
    "blue": (0.25, 0.5, 1.0),
    "yellow": (1.0, 0.92, 0.15),
    "cyan": (0.15, 0.92, 0.95),
    "magenta": (0.95, 0.2, 0.9),
    "orange": (1.0, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95),
}
REACH = 1.15  # the farthest any shape of "radius" r reaches from its centre, in units of r
MARGIN = 0.5  # pixels kept free between a shape's reach and the frame edge


class ShapesOptions(BaseModel):
    """Options of the `shapes` dataset (frames, size, seed and length come from the trainer)."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] | None = Field(
        None,
        description=f"subset of motion classes to use, relabelled 0..n-1 in this order; default all: {', '.join(CLASSES)}",
    )
    background: Literal["random", "black"] = Field(
        "random", description="'random': a random dark colour per clip; 'black': always black"
    )
    edge: float = Field(1.0, ge=0.0, le=8.0, description="anti-aliased edge width in pixels (0 = hard edge)")

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        unknown = [c for c in value if c not in CLASSES]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(f"classes must be distinct names from {', '.join(CLASSES)}; got {value}")
        return value


def _sdf(shape: str, px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of a shape of radius r [T,1,1] at local coords px, py [T,H,W]."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return _box(px, py, 0.8 * r, 0.8 * r)
    if shape == "cross":
        return np.minimum(_box(px, py, 0.95 * r, 0.35 * r), _box(px, py, 0.35 * r, 0.95 * r))
    # equilateral triangle, apex up (image y points down), half side r, centred on its centroid
    k = math.sqrt(3.0)
    x, y = np.abs(px) - r, -py + r / k
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0.0)
    return -np.hypot(x, y) * np.sign(y)


def _box(px: np.ndarray, py: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Signed distance to an axis-aligned box with half sizes bx, by."""
    qx, qy = np.abs(px) - bx, np.abs(py) - by
    return np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0)


def _trajectory(motion: str, u: np.ndarray, height: int, width: int, rng: np.random.Generator):
    """Per-frame centre x, y, radius r and angle [T] (pixels / radians) for clip times u [T] in [0, 1]."""
    side = min(height, width)
    steps = max(len(u) - 1, 1)  # frame-to-frame steps; caps the per-frame angle so motion stays unambiguous
    ones = np.ones_like(u)

    def place(r_max: float, axis_len: int) -> float:  # a uniform centre that keeps reach r_max in frame
        lo = REACH * r_max + MARGIN
        return rng.uniform(lo, max(lo, axis_len - lo))

    angle = rng.uniform(-0.25, 0.25) * ones  # upright-ish unless rotating
    if motion in ("grow", "shrink"):
        small, big = max(1.0, rng.uniform(0.06, 0.1) * side), rng.uniform(0.24, 0.32) * side
        r = small + (big - small) * (u if motion == "grow" else 1 - u)
        x, y = place(big, width) * ones, place(big, height) * ones
    elif motion == "rotate":
        r = max(1.5, rng.uniform(0.2, 0.3) * side) * ones
        x, y = place(r[0], width) * ones, place(r[0], height) * ones
        turn = min(rng.uniform(0.6, 1.4) * math.pi, steps * math.pi / 6)  # <= 30 deg a frame: no wagon wheel
        angle = angle + rng.choice([-1.0, 1.0]) * turn * u
    elif motion == "orbit":
        r = max(1.5, rng.uniform(0.08, 0.12) * side) * ones
        radius = rng.uniform(0.2, 0.28) * side
        cx, cy = place(radius / REACH + r[0], width), place(radius / REACH + r[0], height)
        turn = min(rng.uniform(0.6, 1.0) * 2 * math.pi, steps * math.pi / 3)  # <= 60 deg a frame
        phi = rng.uniform(0, 2 * math.pi) + rng.choice([-1.0, 1.0]) * turn * u
        x, y = cx + radius * np.cos(phi), cy + radius * np.sin(phi)
    else:  # a constant-size shape: linear moves, bounce, still
        r = max(1.5, rng.uniform(0.1, 0.17) * side) * ones
        lo = REACH * r[0] + MARGIN
        x, y = place(r[0], width) * ones, place(r[0], height) * ones
        if motion in ("left", "right", "up", "down"):
            span = max(0.0, (width if motion in ("left", "right") else height) - 2 * lo)
            dist = rng.uniform(0.5, 1.0) * span
            start = lo + rng.uniform(0, span - dist)
            pos = start + dist * (u if motion in ("right", "down") else 1 - u)
            x, y = (pos, y) if motion in ("left", "right") else (x, pos)
        elif motion == "bounce":  # free fall between bounces: height 4p(1-p) of the phase p
            floor, amp = height - lo, rng.uniform(0.6, 1.0) * max(0.0, height - 2 * lo)
            bounces = min(rng.uniform(1.0, 2.0), steps / 4)  # >= 4 frames a bounce
            p = np.mod(bounces * u + rng.uniform(0, 1), 1.0)
            y = floor - amp * 4 * p * (1 - p)
    return x, y, r, angle


def render(
    shape: str,
    x: np.ndarray,
    y: np.ndarray,
    r: np.ndarray,
    angle: np.ndarray,
    fg: np.ndarray,
    bg: np.ndarray,
    height: int,
    width: int,
    edge: float = 1.0,
) -> np.ndarray:
    """Per-frame pose x, y, r, angle [T] and colours fg, bg [3] in [0, 1] -> float32 [3, T, H, W] in [0, 1]."""
    x, y, r, angle = (np.asarray(v, np.float32)[:, None, None] for v in (x, y, r, angle))
    gy, gx = np.meshgrid(
        np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5, indexing="ij"
    )
    dx, dy = gx - x, gy - y
    cos, sin = np.cos(angle), np.sin(angle)
    d = _sdf(shape, cos * dx + sin * dy, -sin * dx + cos * dy, r)
    alpha = np.clip(0.5 - d / edge, 0.0, 1.0) if edge > 0 else (d <= 0).astype(np.float32)
    fg, bg = np.asarray(fg, np.float32), np.asarray(bg, np.float32)
    return bg[:, None, None, None] + (fg - bg)[:, None, None, None] * alpha[None]


class ShapesDataset(Dataset):
    """Map-style dataset: item i -> {"video": float32 [3, T, H, W] in [-1, 1], "label": int, "caption": str}."""

    def __init__(
        self,
        frames: int,
        height: int,
        width: int,
        *,
        seed: int = 0,
        length: int = 10000,
        classes: list[str] | None = None,
        background: str = "random",
        edge: float = 1.0,
    ):
        if min(frames, height, width) < 1 or length < 1 or seed < 0:
            raise ConfigError(
                f"shapes needs frames, height, width, length >= 1 and seed >= 0; got {frames}x{height}x{width}, length {length}, seed {seed}"
            )
        ShapesOptions(classes=classes, background=background, edge=edge)  # validate direct calls too
        self.frames, self.height, self.width = frames, height, width
        self.seed, self.length = seed, length
        self.classes = tuple(classes or CLASSES)
        self.num_classes = len(self.classes)
        self.background, self.edge = background, edge

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for shapes dataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes  # balanced classes; the loader shuffles
        motion = self.classes[label]
        shape = (
            SHAPES[rng.integers(1, len(SHAPES))] if motion == "rotate" else SHAPES[rng.integers(len(SHAPES))]
        )
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        fg = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0)
        bg = rng.uniform(0.0, 0.2, 3) if self.background == "random" else np.zeros(3)
        if self.frames > 1:
            u = np.linspace(0.0, 1.0, self.frames)
        else:  # a single image: a random moment of the motion
            u = np.full(1, rng.uniform())
        x, y, r, angle = _trajectory(motion, u, self.height, self.width, rng)
        video = render(shape, x, y, r, angle, fg, bg, self.height, self.width, self.edge)
        article = "an" if colour[0] in "aeiou" else "a"
        return {
            "video": torch.from_numpy(video * 2.0 - 1.0),
            "label": label,
            "caption": f"{article} {colour} {shape} {MOTION_PHRASES[motion]}",
        }


def write_preview(
    out_dir: str | Path,
    num: int | None = None,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
) -> list[Path]:
    """Write `num` clips (default one per class) as mp4 plus grid.png (one row per clip); returns the paths."""
    from eflow.api import write_grid_png, write_mp4

    out_dir = Path(out_dir)
    dataset = ShapesDataset(frames, height, width, seed=seed)
    items = [dataset[i] for i in range(num if num is not None else dataset.num_classes)]
    paths = []
    for i, item in enumerate(items):
        paths.append(
            write_mp4(out_dir / f"{i:02d}_{dataset.classes[item['label']]}.mp4", item["video"], fps=8)
        )
    paths.append(write_grid_png(out_dir / "grid.png", torch.stack([item["video"] for item in items])))
    return paths


@hookimpl
def register_datasets(register):
    register(
        "shapes",
        ShapesDataset,
        summary=f"embedded default: procedural clips of a shape, {NUM_CLASSES} motion classes, with captions",
        options=ShapesOptions,
    )
