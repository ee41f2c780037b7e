"""Skipped files: why a file was left out, one warning per file, and counts by reason.

Reasons:
  unreadable  the file cannot be opened or probed (not a video, no video stream, cut off before its index)
  corrupt     the file opens but decoding fails, or it holds fewer frames than its header promises
  too_short   the file has fewer frames (or seconds) than one clip needs

A dataset records a SkipEvent(path, reason, detail) where it finds a bad file: at its start-up scan (in
the main process) or while loading an item (possibly in a DataLoader worker), and hands the events over
through `take_skips()`. The loader carries a worker's events to the main process inside the batch;
there SkipLog keeps the first reason seen for each file, warns once per file (through the `warn`
callback it is given, by default the logger "eflow.data"), and counts files by reason for
metrics.jsonl and the end-of-run summary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

REASONS = ("unreadable", "corrupt", "too_short")
log = logging.getLogger("eflow.data")


class MediaError(Exception):
    """A file that cannot give a clip; `reason` is one of REASONS, `detail` says what went wrong."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; choices: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class SkipEvent:
    """One bad file found by a dataset."""

    path: str
    reason: str
    detail: str


class SkipLog:
    """The run's record of skipped files (main process): first reason per file, one warning each."""

    def __init__(self, warn: Callable[[str], None] | None = log.warning):
        self.warn = warn  # None: count silently (e.g. on ranks other than 0)
        self.reasons: dict[str, str] = {}  # path -> reason

    def add(self, events: Iterable[SkipEvent]) -> list[SkipEvent]:
        """Record events; returns those about files not seen before (each warned about once)."""
        new = []
        for event in events:
            if event.path in self.reasons:
                continue
            self.reasons[event.path] = event.reason
            new.append(event)
            if self.warn is not None:
                self.warn(f"skipping {event.path} ({event.reason}): {event.detail}")
        return new

    def counts(self) -> dict[str, int]:
        """Skipped files by reason (only reasons that occurred)."""
        out: dict[str, int] = {}
        for reason in self.reasons.values():
            out[reason] = out.get(reason, 0) + 1
        return {r: out[r] for r in REASONS if r in out}

    def summary(self) -> str:
        """'3 files skipped: 1 unreadable, 1 corrupt, 1 too_short', or '' when none was."""
        counts = self.counts()
        if not counts:
            return ""
        total = sum(counts.values())
        parts = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        return f"{total} file{'s' if total > 1 else ''} skipped: {parts}"

    def state(self) -> dict[str, list[str]]:
        """Checkpointable form (plain lists of strings)."""
        return {"paths": list(self.reasons), "reasons": list(self.reasons.values())}

    def load_state(self, state: dict[str, list[str]]) -> None:
        """Restore a checkpointed record: files already reported are not warned about again."""
        self.reasons.update(zip(state.get("paths", []), state.get("reasons", []), strict=True))


def take_skips(dataset) -> list[SkipEvent]:
    """The dataset's new skip events (empty for a dataset that does not record any)."""
    take = getattr(dataset, "take_skips", None)
    return list(take()) if callable(take) else []
