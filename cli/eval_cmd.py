"""`eflow eval`: FVD and sample class accuracy of a run, the in-domain extractor, comparisons.

    eflow eval RUN_DIR [options]          evaluate one run (shorthand for `eflow eval run RUN_DIR`)
    eflow eval train-extractor --data D   train and cache the in-domain classifier
    eflow eval compare RUN_DIR...         table + bar chart of several runs' eval.json

The group dispatches a first argument that is not a subcommand name to `run`, so `eflow eval
runs/demo` works; a run directory literally named like a subcommand needs `eflow eval run NAME`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices
from eflow.config import parse_assignments
from eflow.run_config import parse_size

DEFAULT_COMMAND = "run"


class RunByDefault(TyperGroup):
    """A group whose first argument, when it is not a subcommand, goes to the `run` command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            near = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.75)
            if near and not Path(args[0]).exists():  # a mistyped subcommand, not a run directory
                ctx.fail(f"no command or run directory '{args[0]}'. Did you mean '{near[0]}'?")
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=RunByDefault,
    help="Evaluate runs: FVD (I3D or in-domain) and sample class accuracy; `eflow eval RUN_DIR` runs `run`.",
    no_args_is_help=True,
)

SAMPLING = "Sampling"
FEATURES = "Features and real data"


@eval_app.command(DEFAULT_COMMAND)
def run_eval(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `eflow train`")],
    metric: Annotated[str, typer.Option(help="comma-separated metrics: fvd, accuracy")] = "fvd,accuracy",
    num: Annotated[
        int, typer.Option("--num", "-n", help="real clips and generated clips (FVD standard: 2048)")
    ] = 2048,
    extractor: Annotated[
        str, typer.Option(help=f"FVD features: {choices('feature_extractor')}", rich_help_panel=FEATURES)
    ] = "indomain",
    i3d_path: Annotated[
        Path | None,
        typer.Option(
            help="TorchScript I3D file for --extractor i3d (default $EFLOW_I3D_PATH)",
            rich_help_panel=FEATURES,
        ),
    ] = None,
    extractor_option: Annotated[
        list[str] | None,
        typer.Option(
            help="extractor option KEY=VALUE (repeatable), e.g. frames=16 for i3d (each extractor's options: docs/eval.md)",
            rich_help_panel=FEATURES,
        ),
    ] = None,
    real: Annotated[
        str | None, typer.Option(help="real dataset (default: the run's)", rich_help_panel=FEATURES)
    ] = None,
    cov: Annotated[
        str,
        typer.Option(
            help="covariance normalization: n-1 (unbiased) or n (StyleGAN-V)", rich_help_panel=FEATURES
        ),
    ] = "n-1",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="cache root (default $EFLOW_CACHE_DIR or ~/.cache/eflow)", rich_help_panel=FEATURES
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="recompute the real statistics", rich_help_panel=FEATURES)
    ] = False,
    steps: Annotated[
        int | None, typer.Option(help="sampling steps (default: the run's)", rich_help_panel=SAMPLING)
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="guidance scale w (default: the run's)", rich_help_panel=SAMPLING)
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="sampler (default: the run's own)", rich_help_panel=SAMPLING)
    ] = None,
    sampler_option: Annotated[
        list[str] | None,
        typer.Option(
            help="sampler option KEY=VALUE over the run's (repeatable), e.g. shift=1.0",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="sampling seed and real-subset seed", rich_help_panel=SAMPLING)
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="clips per batch", rich_help_panel=SAMPLING)] = 64,
    weights: Annotated[
        str, typer.Option(help="ema or model (online) weights", rich_help_panel=SAMPLING)
    ] = "ema",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    out: Annotated[Path | None, typer.Option(help="report path (default: RUN_DIR/eval.json)")] = None,
) -> None:
    """Evaluate a run: generate NUM clips, FVD against NUM real clips, sample class accuracy."""
    from eflow.errors import ConfigError
    from eflow.eval.classifier_training import WEAK_CLASSIFIER
    from eflow.eval.evaluate import EvalSettings, evaluate
    from eflow.eval.progress import eval_progress
    from eflow.eval.report import EVAL_FILE, eval_tables, write_report

    with user_errors():
        extractor_options = parse_assignments(extractor_option, "--extractor-option", "frames=16")
        if i3d_path is not None:
            if extractor != "i3d":
                raise ConfigError(f"--i3d-path is for --extractor i3d (got --extractor {extractor})")
            extractor_options["path"] = str(i3d_path)
        settings = EvalSettings(
            metrics=[m.strip() for m in metric.split(",") if m.strip()],
            extractor=extractor,
            extractor_options=extractor_options,
            num=num,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            sampler_options=parse_assignments(sampler_option, "--sampler-option", "shift=1.0"),
            seed=seed,
            batch_size=batch_size,
            device=device,
            weights=weights,
            real=real,
            cov=cov.lower(),
            cache_dir=str(cache_dir) if cache_dir else None,
            use_cache=not no_cache,
        )
        with eval_progress(console=err_console) as progress:
            report = evaluate(run_dir, settings, progress)
        path = write_report(report, out or run_dir / EVAL_FILE)
        console = _stdout_console()
        for table in eval_tables(report):
            console.print(table)
        from rich.markup import escape

        held = report.get("accuracy", {}).get("classifier", {}).get("heldout_accuracy")
        if held is not None and held < WEAK_CLASSIFIER:
            err_console.print(
                f"[yellow]warning:[/] the in-domain classifier's held-out accuracy is {held:.3f} (below "
                f"{WEAK_CLASSIFIER}): this class accuracy means little; retrain it with eflow eval "
                "train-extractor --train-clips N"
            )
        for note in report["sampling"].get("notes", []):
            err_console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
        if "fvd" in report and report["fvd"]["eps_added"]:
            err_console.print(
                f"note: the covariance product was near singular; eps {report['fvd']['eps_added']:g} was added "
                "to both covariances (use more clips than feature dimensions)"
            )
        err_console.print(f"[green]wrote[/] {path} in {report['timing_s']['total']:.1f} s")


@eval_app.command("train-extractor")
def train_extractor(
    data: Annotated[str | None, typer.Option(help=f"dataset: {choices('dataset')} (default shapes)")] = None,
    data_option: Annotated[
        list[str] | None, typer.Option(help="dataset option KEY=VALUE (repeatable), e.g. background=black")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="frames per clip (default 8)")] = None,
    size: Annotated[str | None, typer.Option(help="N or HxW pixels (default 32)")] = None,
    run: Annotated[
        Path | None, typer.Option(help="take dataset, options and clip shape from this run's config.json")
    ] = None,
    train_clips: Annotated[int, typer.Option(help="clips trained on")] = 4000,
    heldout_clips: Annotated[int, typer.Option(help="held-out clips for the accuracy")] = 1000,
    epochs: Annotated[int, typer.Option(help="passes over the training clips")] = 4,
    batch_size: Annotated[int, typer.Option(help="clips per optimizer step")] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate (one-cycle)")] = 3e-3,
    net_width: Annotated[int, typer.Option(help="channels of the first stage; features are 4x as wide")] = 32,
    seed: Annotated[int, typer.Option(help="dataset seed, split and initialization")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    cache_dir: Annotated[
        Path | None, typer.Option(help="cache root (default $EFLOW_CACHE_DIR or ~/.cache/eflow)")
    ] = None,
) -> None:
    """Train the in-domain classifier (FVD features + sample class accuracy) and cache it."""
    from rich.table import Table

    from eflow.assembly import resolve_device
    from eflow.eval.classifier_training import WEAK_CLASSIFIER, ClassifierTraining, train_and_cache
    from eflow.eval.extractor_data import extractor_data
    from eflow.eval.progress import eval_progress

    with user_errors():
        options = parse_assignments(data_option, "--data-option", "frames=16")
        source = extractor_data(run, data, options, frames, parse_size(size) if size is not None else None)
        name, t, h, w = source.name, source.frames, source.height, source.width
        settings = ClassifierTraining(train_clips, heldout_clips, epochs, batch_size, lr, net_width, seed)
        dev = resolve_device(device)
        with eval_progress(console=err_console) as progress:
            path, meta = train_and_cache(
                name, source.options, t, h, w, settings, dev, str(cache_dir) if cache_dir else None, progress
            )
        held = meta["heldout"]
        table = Table(title="held-out accuracy per class", title_justify="left")
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        table.add_column("clips", justify="right")
        for cls, row in held["per_class"].items():
            table.add_row(cls, f"{row['accuracy']:.3f}", str(row["n"]))
        console = _stdout_console()
        console.print(table)
        console.print(
            f"in-domain classifier for {name} {t}x{h}x{w}: held-out accuracy {held['accuracy']:.3f} "
            f"({held['n']} clips)"
        )
        if held["accuracy"] < WEAK_CLASSIFIER:
            err_console.print(
                f"[yellow]warning:[/] held-out accuracy {held['accuracy']:.3f} is below {WEAK_CLASSIFIER}: "
                "the class accuracy and in-domain FVD measured with it will mean little; train it on more "
                "clips (--train-clips) or for more epochs (--epochs)"
            )
        err_console.print(f"[green]cached[/] {path}")


@eval_app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories (their eval.json) or eval.json files")],
    out: Annotated[Path, typer.Option(help="bar chart PNG")] = Path("eval_compare.png"),
) -> None:
    """Compare the eval.json of several runs: a table and a bar chart PNG."""
    from eflow.eval.report import compare_chart, compare_table, protocol_differences, read_report

    with user_errors():
        reports = [read_report(r) for r in runs]
        _stdout_console().print(compare_table(reports))
        differing = protocol_differences(reports)
        if differing:
            err_console.print(
                f"[yellow]warning:[/] the runs were evaluated under different protocols ({', '.join(differing)}); "
                "their numbers are not directly comparable"
            )
        path = compare_chart(reports, out)
        if path is None:
            err_console.print(
                "note: matplotlib is not installed (pip install 'eflow[plots]'); no chart written"
            )
        else:
            err_console.print(f"[green]wrote[/] {path}")


def _stdout_console():
    from rich.console import Console

    return Console(soft_wrap=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
