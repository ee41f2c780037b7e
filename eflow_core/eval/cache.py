"""Where evaluation keeps what it can reuse: trained in-domain extractors and real-data statistics.

The root is, first found: the `--cache-dir` option, $EFLOW_CACHE_DIR, $XDG_CACHE_HOME/eflow,
~/.cache/eflow. Under it:

    extractors/    in-domain classifiers, one file per (dataset + options, clip shape, version)
    real-stats/    float64 feature statistics of real clips, one file per (dataset, extractor, protocol, N)

Every file name ends in a key: the first 16 hex digits of the SHA-256 of a canonical JSON record
of what the file depends on (sorted keys), so a change to any of those misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "EFLOW_CACHE_DIR"
EXTRACTORS = "extractors"
REAL_STATS = "real-stats"


def cache_root(override: str | Path | None = None) -> Path:
    """The cache directory (not created here)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "eflow"


def cache_key(record: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of `record`."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    """A file-name-safe rendering of a plugin name (letters, digits, '-', '_', '.')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
