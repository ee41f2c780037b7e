"""Timing one callable: untimed warm-up (the first call timed on its own), timed repeats, peak memory.

CUDA: one pair of CUDA events around each timed call, one torch.cuda.synchronize() after the last, so
the times are GPU times without host gaps between calls; the first call is timed with
time.perf_counter() between two synchronizations (it includes compilation, e.g. torch.compile of
flex_attention). CPU: time.perf_counter() around each call.

Memory (CUDA only): the peak statistics are reset after the warm-up; `base_bytes` is what is allocated
then (weights, inputs, their context) and `peak_bytes` the largest allocation seen during the timed calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Times of one callable in milliseconds, plus CUDA memory in bytes (None on CPU)."""

    times_ms: list[float]
    first_call_ms: float | None  # the first warm-up call (compilation included); None without warm-up
    base_bytes: int | None = None  # allocated before the timed calls
    peak_bytes: int | None = None  # peak allocated during the timed calls

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    before_each: Callable[[], None] | None = None,
) -> Timing:
    """Run fn() `warmup` times untimed, then `repeats` times timed; `before_each` runs outside the timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    prepare = before_each or (lambda: None)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    first_call_ms = None
    for i in range(warmup):
        prepare()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first_call_ms = (time.perf_counter() - start) * 1e3

    base_bytes = peak_bytes = None
    if cuda:
        prepare()
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start_event, end_event in events:
            prepare()
            start_event.record()
            fn()
            end_event.record()
        torch.cuda.synchronize(device)
        times = [start_event.elapsed_time(end_event) for start_event, end_event in events]
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        times = []
        for _ in range(repeats):
            prepare()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return Timing(times, first_call_ms, base_bytes, peak_bytes)
