"""`eflow export RUN`: a checkpoint in the full layout, a sharded one consolidated (eflow.train.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from eflow.cli.errors import err_console, user_errors


def register(app: typer.Typer) -> None:
    @app.command(name="export")
    def export_(
        run: Annotated[Path, typer.Argument(help="a run directory written by `eflow train`")],
        step: Annotated[
            int | None, typer.Option(help="the checkpoint of this step (default: the newest usable one)")
        ] = None,
        out: Annotated[
            Path | None, typer.Option(help="new directory to write (default: RUN/exports/step_N)")
        ] = None,
    ) -> None:
        """Write a checkpoint as model.safetensors + ema.safetensors + trainer_state.pt (the optimizer:
        the export resumes with --resume), consolidating a sharded one."""
        from eflow.train.export import export_checkpoint

        def warn(message: str) -> None:
            err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

        with user_errors():
            done = export_checkpoint(run, step=step, out=out, warn=warn)
        origin = f"sharded over {done.world_size} ranks" if done.sharded else "full"
        source = escape(str(done.source))
        err_console.print(f"[green]exported[/] step {done.step} ({origin}) of {source}", highlight=False)
        typer.echo(done.out)
