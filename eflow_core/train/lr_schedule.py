"""The learning rate of an optimizer step: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    lr: float,
    warmup: int = 0,
    schedule: str = "constant",
    min_ratio: float = 0.0,
) -> float:
    """lr at 0-based `step`: lr (step + 1) / warmup during warm-up; then lr (constant) or
    lr (min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2) with p the fraction of the post-warm-up steps done."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose constant or cosine")
    span = max(total_steps - warmup, 1)
    p = min(max(step - warmup, 0) / span, 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
