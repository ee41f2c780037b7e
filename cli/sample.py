"""`eflow sample RUN_DIR`: load a run's resolved config and weights, sample, write mp4 + gif + PNG grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from eflow.cli.errors import err_console, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def sample(
        run_dir: Annotated[Path, typer.Argument(help="a run directory written by `eflow train`")],
        steps: Annotated[
            int | None, typer.Option(help="sampling steps (default: the run's, EFlow: 4)")
        ] = None,
        guidance: Annotated[float | None, typer.Option(help="guidance scale w (EFlow: 4.0)")] = None,
        label: Annotated[
            int | None, typer.Option(help="class id for every video (default: classes in turn)")
        ] = None,
        caption: Annotated[
            list[str] | None, typer.Option(help="caption(s) for text-conditioned runs")
        ] = None,
        num: Annotated[int | None, typer.Option(help="number of videos")] = None,
        seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
        sampler: Annotated[str | None, typer.Option(help="sampler (default: the objective's own)")] = None,
        batch_size: Annotated[
            int | None, typer.Option(help="videos generated at once (default: the run's, 16)")
        ] = None,
        each: Annotated[
            bool, typer.Option("--each", help="also write every video as videos/NNNNNN.mp4")
        ] = False,
        weights: Annotated[str, typer.Option(help="ema or model (online) weights")] = "ema",
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
        out: Annotated[Path | None, typer.Option(help="output directory (default: RUN_DIR/samples)")] = None,
    ) -> None:
        """Sample videos from a trained run (all files of a call replace the previous call's together)."""
        from eflow.assembly import resolve_device
        from eflow.errors import EflowError
        from eflow.loaded_run import load_run
        from eflow.sample_run import sample_run

        with user_errors():
            run = load_run(run_dir, resolve_device(device), weights)
            out_dir = out or run_dir / "samples"
            progress = Progress(
                TextColumn("[bold]sample[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            tasks: list = []

            def advance(done: int, total: int) -> None:  # a bar from the first batch, when more follow
                if not tasks:
                    if done >= total:
                        return  # one batch: nothing left to show progress for
                    progress.start()
                    tasks.append(progress.add_task("sample", total=total))
                progress.update(tasks[0], advance=done)

            try:
                result = sample_run(
                    run,
                    out_dir,
                    steps=steps,
                    guidance=guidance,
                    num=num,
                    seed=seed,
                    sampler=sampler,
                    batch_size=batch_size,
                    label=label,
                    captions=caption,
                    each=each,
                    on_batch=advance,
                )
            except OSError as err:
                raise EflowError(f"cannot write to --out {out_dir}: {err.strerror or err}") from None
            finally:
                if tasks:
                    progress.stop()
            err_console.print(
                f"[green]sampled[/] {result.num} videos with '{result.sampler}' ({result.steps} steps, "
                f"w={result.guidance}) from {weights} weights at step {run.step}:"
            )
            for kind, path in result.paths.items():
                typer.echo(f"  {kind}: {path}")
