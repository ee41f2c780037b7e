"""`eflow plot RUN [RUN ...]`: loss, learning rate, throughput and validation curves of runs, overlaid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def plot(
        runs: Annotated[list[Path], typer.Argument(help="run directories written by `eflow train`")],
        out: Annotated[
            Path | None, typer.Option(help="output directory (default: the first run's plots/)")
        ] = None,
        smooth: Annotated[
            float, typer.Option(help="EMA factor of the loss curves, drawn over the raw ones; 0 = raw")
        ] = 0.6,
        metric: Annotated[
            list[str] | None, typer.Option(help="also plot this metrics.jsonl field (repeatable)")
        ] = None,
    ) -> None:
        """Plot runs' metrics.jsonl against steps (and wall-clock hours), one PNG per metric group (needs matplotlib)."""
        from eflow.plots import plot_runs

        with user_errors():
            paths = plot_runs(runs, out, smooth=smooth, metrics=metric or [])
            err_console.print(f"[green]plotted[/] {len(runs)} run(s):")
            for group, path in paths.items():
                typer.echo(f"  {group}: {path}")
