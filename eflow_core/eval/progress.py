"""The rich progress bar evaluation shows on stderr (one task per phase: real clips, generation, training)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def eval_progress(enabled: bool = True, console: Console | None = None) -> Progress:
    """A Progress with description, bar, done/total, elapsed and remaining time; silent if not enabled."""
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
    )
