"""`eflow repro TABLE`: retrain and re-evaluate the rows of EFlow Tables 2-4 (eflow.repro.runner)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors

SCALE, EVAL, RUN, ROWS = "Scale (every row)", "Evaluation", "Run", "Rows"


def register(app: typer.Typer) -> None:
    @app.command()
    def repro(
        table: Annotated[str, typer.Argument(help="table2, table3, table4 or all")],
        rows: Annotated[
            str | None, typer.Option(help="rows to run, comma-separated (default: all)", rich_help_panel=ROWS)
        ] = None,
        extra_row: Annotated[
            list[str] | None,
            typer.Option(
                help="add a row NAME=FLAGS on top of the table's base row, e.g. 'mine=--attn my-attn' "
                "(eflow train flags, plus --nfe N); repeatable",
                rich_help_panel=ROWS,
            ),
        ] = None,
        list_: Annotated[
            bool,
            typer.Option(
                "--list", help="print the rows, their eflow train commands and exit", rich_help_panel=ROWS
            ),
        ] = False,
        preset: Annotated[
            str | None,
            typer.Option(help="model preset (default: the paper's, XL or B)", rich_help_panel=SCALE),
        ] = None,
        data: Annotated[
            str | None, typer.Option(help="dataset (default shapes)", rich_help_panel=SCALE)
        ] = None,
        frames: Annotated[int | None, typer.Option(help="frames per clip", rich_help_panel=SCALE)] = None,
        size: Annotated[str | None, typer.Option(help="clip size: N or HxW", rich_help_panel=SCALE)] = None,
        steps: Annotated[
            int | None, typer.Option(help="optimizer steps per row", rich_help_panel=SCALE)
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option(help="global batch size", rich_help_panel=SCALE)
        ] = None,
        seed: Annotated[
            int | None,
            typer.Option(help="training seed and evaluation seed (default 0)", rich_help_panel=SCALE),
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="run.toml every row starts from", rich_help_panel=SCALE)
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set", help="override a field of every row: --set train.lr=1e-3", rich_help_panel=SCALE
            ),
        ] = None,
        match: Annotated[
            str,
            typer.Option(
                help="iterations (every row trains --steps) or compute (equal model FLOPs to the first row)",
                rich_help_panel=SCALE,
            ),
        ] = "iterations",
        eval_num: Annotated[
            int, typer.Option(help="generated and real clips per evaluation", rich_help_panel=EVAL)
        ] = 2048,
        eval_batch_size: Annotated[int, typer.Option(help="clips per eval batch", rich_help_panel=EVAL)] = 64,
        i3d_path: Annotated[
            Path | None,
            typer.Option(
                help="TorchScript I3D file: FVD with I3D features (else in-domain FVD)", rich_help_panel=EVAL
            ),
        ] = None,
        cache_dir: Annotated[
            Path | None,
            typer.Option(
                help="eval cache (default $EFLOW_CACHE_DIR or ~/.cache/eflow)", rich_help_panel=EVAL
            ),
        ] = None,
        device: Annotated[
            str | None, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=RUN)
        ] = None,
        out: Annotated[
            Path, typer.Option(help="root of the tables' run directories", rich_help_panel=RUN)
        ] = Path("runs/repro"),
        parallel: Annotated[
            int, typer.Option(help="rows at once, as child processes", rich_help_panel=RUN)
        ] = 1,
        gpus: Annotated[
            int,
            typer.Option(
                help="CUDA devices the --parallel children cycle over (0: all see every device)",
                rich_help_panel=RUN,
            ),
        ] = 0,
        report_only: Annotated[
            bool,
            typer.Option(
                "--report-only",
                help="write each table's report from the row folders under --out (e.g. rows finished in "
                "several sittings, copied back without weights); train and evaluate nothing",
                rich_help_panel=RUN,
            ),
        ] = False,
        worker: Annotated[int, typer.Option(hidden=True)] = 0,
    ) -> None:
        """Retrain and re-evaluate the rows of EFlow Table 2, 3 or 4 at a chosen scale (docs/repro.md)."""
        from eflow.repro.runner import ReproSpec, plan, run_repro

        with user_errors():
            spec = ReproSpec(
                table=table,
                rows=[r.strip() for r in rows.split(",") if r.strip()] if rows else None,
                extra_rows=list(extra_row or []),
                preset=preset,
                data=data,
                frames=frames,
                size=size,
                steps=steps,
                batch_size=batch_size,
                seed=seed,
                device=device,
                config=str(config) if config is not None else None,
                sets=list(set_ or []),
                match=match,
                eval_num=eval_num,
                eval_batch_size=eval_batch_size,
                i3d_path=str(i3d_path) if i3d_path is not None else None,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                out=str(out),
                parallel=parallel,
                gpus=gpus,
                worker=worker,
                report_only=report_only,
            )
            if list_:
                _print_rows(spec, plan(spec))
                return
            result = run_repro(spec, err_console, shlex.join(["eflow", *sys.argv[1:]]))
        if worker:
            return
        from rich.console import Console

        console = Console(soft_wrap=False)
        from eflow.repro.report import rich_tables

        for name, document in result.documents.items():
            for view in rich_tables(document):
                console.print(view)
            files = result.files[name]
            err_console.print(f"[green]wrote[/] {', '.join(str(f) for f in files)}")
            if not any(str(f).endswith(".png") for f in files):
                err_console.print(
                    "note: matplotlib is not installed (pip install 'eflow[plots]'); no chart written"
                )
        if result.errors:
            err_console.print(
                f"[bold red]error:[/] {len(result.errors)} row(s) failed: {', '.join(result.errors)}; "
                "fix and run the same command again (finished rows are skipped)"
            )
            raise typer.Exit(code=2)


def _print_rows(spec, plans) -> None:
    """Each row picked (--rows): the paper's columns and FVD, NFE, steps, the eflow train command of its
    run, the source; a table without a picked row is left out."""
    from rich.console import Console
    from rich.markup import escape

    from eflow.repro.rows import train_command

    console = Console(soft_wrap=True, highlight=False)
    for table_plans in plans.values():
        table_plans = [p for p in table_plans if p.selected]
        if not table_plans:
            continue
        console.print(f"[bold]{table_plans[0].table.title}[/]")
        for p in table_plans:
            paper = ", ".join(f"{k} {v}" for k, v in p.row.paper.items())
            fvd = "-" if p.row.paper_fvd is None else f"{p.row.paper_fvd:.1f}"
            steps = str(p.steps) if p.steps_rule == "iterations" else f"{p.steps} ({p.steps_rule})"
            scale = {**spec.scale(p.table), "steps": p.steps}
            command = train_command(p.row, scale, p.run_dir, spec.sets, spec.config)
            console.print(
                f"  [bold]{p.row.name}[/] ({escape(p.row.label)}: {escape(paper)}): paper FVD {fvd}, "
                f"NFE {p.row.nfe}, steps {escape(steps)}"
            )
            console.print(f"    {escape(command)}")
            console.print(f"    [dim]source: {escape(p.row.source)}[/]")
