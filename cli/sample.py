"""`eflow sample RUN_DIR`: load a run's resolved config and weights, sample, write mp4 + gif + PNG grid
(under torchrun with --sp N: N processes split every model call, rank 0 writes; eflow.sample_run)."""

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
        num: Annotated[
            int | None,
            typer.Option(
                "--num",
                "-n",
                help="number of videos (-n under torchrun, which takes --num for its --numa-binding)",
            ),
        ] = None,
        seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
        sampler: Annotated[str | None, typer.Option(help="sampler (default: the objective's own)")] = None,
        sampler_option: Annotated[
            list[str] | None,
            typer.Option(help="sampler option KEY=VALUE over the run's (repeatable), e.g. shift=1.0"),
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option(help="videos generated at once (default: the run's, 16)")
        ] = None,
        each: Annotated[
            bool, typer.Option("--each", help="also write every video as videos/NNNNNN.mp4")
        ] = False,
        weights: Annotated[str, typer.Option(help="ema or model (online) weights")] = "ema",
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
        out: Annotated[
            Path | None,
            typer.Option(
                help="output directory (default: RUN_DIR/samples; for RUN/checkpoints/step_N: RUN/samples/step_N)"
            ),
        ] = None,
        sp: Annotated[
            int,
            typer.Option(
                help="Ulysses sequence parallelism under torchrun: groups of N processes split every model "
                "call's tokens (N must divide the process count; the groups take the batches in turn); "
                "rank 0 writes"
            ),
        ] = 1,
    ) -> None:
        """Sample videos from a trained run (all files of a call replace the previous call's together)."""
        from eflow.config import parse_assignments
        from eflow.sample_run import sample_run_dir

        with user_errors():
            sampler_options = parse_assignments(sampler_option, "--sampler-option", "shift=1.0")
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
                result = sample_run_dir(
                    run_dir,
                    out,
                    device=device,
                    weights=weights,
                    sp=sp,
                    steps=steps,
                    guidance=guidance,
                    num=num,
                    seed=seed,
                    sampler=sampler,
                    sampler_options=sampler_options,
                    batch_size=batch_size,
                    label=label,
                    captions=caption,
                    each=each,
                    on_batch=advance,
                )
            finally:
                if tasks:
                    progress.stop()
            if not result.wrote:
                return  # a rank 1.. under torchrun: rank 0 reports
            from rich.markup import escape

            for note in result.notes:
                err_console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
            err_console.print(
                f"[green]sampled[/] {result.num} videos with '{result.sampler}' ({result.steps} steps, "
                f"w={result.guidance}) from {result.weights} weights at step {result.step} "
                f"in {result.seconds:.1f} s:"
            )
            for kind, path in result.paths.items():
                typer.echo(f"  {kind}: {path}")
