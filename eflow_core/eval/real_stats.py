"""Feature statistics of real clips, computed once per (dataset, extractor, protocol, N) and cached.

The clips are the seeded subset of `clips.subset_indices` (N clips of the dataset built at the
run's clip shape and seed), read in batches, quantized to uint8 and passed through the extractor;
only the float64 accumulators of `FeatureStats` are kept. The cache file
(<cache>/real-stats/<dataset>-<TxHxW>-<extractor>-<key>.npz) holds those accumulators plus a JSON
record of everything the key covers: dataset name, resolved options and seed, clip shape, the
extractor's name, content hash, dimension and protocol, N requested, the subset seed and
STATS_VERSION. The covariance convention is not part of the key: it is applied when the distance
is computed, from the same accumulators.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from eflow.atomic import atomic_path
from eflow.eval.cache import REAL_STATS, cache_key, cache_root, safe_name
from eflow.eval.clips import clip_batches, subset_indices
from eflow.eval.extractor import describe, extract
from eflow.eval.frechet import FeatureStats

STATS_VERSION = 1


def stats_record(
    dataset: str,
    dataset_options: dict[str, Any],
    dataset_seed: int,
    clip: tuple[int, int, int],
    extractor,
    num: int,
    subset_seed: int,
) -> dict[str, Any]:
    """Everything the cached statistics depend on."""
    return {
        "dataset": dataset,
        "dataset_options": dataset_options,
        "dataset_seed": dataset_seed,
        "clip": list(clip),
        "extractor": describe(extractor),
        "num": num,
        "subset_seed": subset_seed,
        "version": STATS_VERSION,
    }


def stats_path(record: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    t, h, w = record["clip"]
    name = f"{safe_name(record['dataset'])}-{t}x{h}x{w}-{safe_name(record['extractor']['name'])}-{cache_key(record)}.npz"
    return cache_root(cache_dir) / REAL_STATS / name


def load_stats(path: Path) -> FeatureStats | None:
    """Cached statistics, or None if the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return FeatureStats.from_state({k: data[k] for k in ("n", "shift", "total", "outer")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # e.g. truncated by a crash
        return None


def save_stats(path: Path, stats: FeatureStats, record: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **stats.state(), record=np.array(json.dumps(record, sort_keys=True)))


def real_statistics(
    dataset,
    record: dict[str, Any],
    extractor,
    batch_size: int,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> tuple[FeatureStats, dict[str, Any]]:
    """Statistics of `record["num"]` real clips of `dataset` (from the cache when possible).

    Returns the stats and {"cache": path, "cache_hit": bool}."""
    path = stats_path(record, cache_dir)
    if use_cache:
        cached = load_stats(path)
        if cached is not None and cached.dim == extractor.dim:
            return cached, {"cache": str(path), "cache_hit": True}
    indices = subset_indices(len(dataset), record["num"], record["subset_seed"])
    stats = FeatureStats(extractor.dim)
    task = progress.add_task("real clips", total=len(indices), info="") if progress is not None else None
    for videos, _labels in clip_batches(dataset, indices, batch_size):
        stats.update(extract(extractor, videos))
        if task is not None:
            progress.update(task, advance=len(videos))
    info = {"cache": str(path), "cache_hit": False}
    try:
        save_stats(path, stats, record)
    except OSError as err:  # an unwritable cache costs time, not the result
        info["cache"] = f"not written ({err.strerror or err})"
    return stats, info
