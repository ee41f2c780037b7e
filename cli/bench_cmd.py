"""`eflow bench attention` (sweep backends x token counts x drop ratios x modes), `eflow bench train` and
`eflow bench sample` (the training and sampling ladders of EFlow Fig. 4) and `eflow bench plot`: options
-> a spec of eflow.bench -> its records, written as they come -> eflow.bench.tables' table and notes."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices

bench_app = typer.Typer(
    help="Benchmarks: time attention backends, the training and sampling ladders; plot the results.",
    no_args_is_help=True,
)

SWEEP, SHAPES, TIMING, OUTPUT = "What to sweep", "Shapes", "Timing", "Output"
RUNGS, CONFIG = "Rungs", "Config and clip"

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        help="a run.toml every rung starts from, e.g. the paper's XL recipe in configs/; flags and --set win",
        rich_help_panel=CONFIG,
    ),
]
PresetOption = Annotated[
    str | None,
    typer.Option(
        help="model preset: tiny, B, XL, XXL, 1.5B (default: the config's, tiny)", rich_help_panel=CONFIG
    ),
]
FramesOption = Annotated[
    int | None,
    typer.Option(
        help="video frames per clip, through the autoencoder (as eflow train; default: the config's, 8)",
        rich_help_panel=CONFIG,
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        help="clip size in pixels: N or HxW (as eflow train; default: the config's, 32)",
        rich_help_panel=CONFIG,
    ),
]
GridOption = Annotated[
    str | None,
    typer.Option(
        help="the token grid T'xH'xW' itself, e.g. 21x30x52 (the clip is derived through the autoencoder and "
        "the patch); instead of --frames/--size",
        rich_help_panel=CONFIG,
    ),
]
TokensOption = Annotated[
    str | None,
    typer.Option(
        help="a token count, e.g. 32760 or 8k: the grid of `bench attention --tokens` (30x52 latent frames)",
        rich_help_panel=CONFIG,
    ),
]
AutoencoderOption = Annotated[
    str | None,
    typer.Option(help=f"autoencoder: {choices('autoencoder')} (default: pixel)", rich_help_panel=CONFIG),
]
VaePathOption = Annotated[
    str | None,
    typer.Option(
        help="local folder of the autoencoder's weights (wan: a Wan 2.1 repo or its vae/)",
        rich_help_panel=CONFIG,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="any base-config field, e.g. --set train.lr=1e-4 (a rung that switches a plugin starts from its defaults)",
        rich_help_panel=CONFIG,
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=TIMING)]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        "--precision",  # eflow train's name for it
        help="autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32",
        rich_help_panel=TIMING,
    ),
]
SeedOption = Annotated[int, typer.Option(help="seed of weights and random inputs", rich_help_panel=TIMING)]
PlotOption = Annotated[
    bool, typer.Option(help="draw the bar chart (needs matplotlib)", rich_help_panel=OUTPUT)
]


def _floats(flag: str, text: str) -> list[float]:
    from eflow.bench.grids import split_list
    from eflow.errors import ConfigError

    try:
        return [float(part) for part in split_list(text)]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated numbers, e.g. 0,0.75") from None


def _backend_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """--set BACKEND.FIELD=VALUE pairs -> {backend: {field: value}} (values read as TOML)."""
    from eflow.config import parse_assignments
    from eflow.errors import ConfigError

    for pair in pairs:
        key, sep, _ = pair.partition("=")
        backend, dot, name = key.strip().partition(".")
        if not sep or not dot or not backend or not name:
            raise ConfigError(
                f"--set {pair!r}: expected BACKEND.FIELD=VALUE, e.g. --set glga.window_frames=6"
            )
    return parse_assignments(pairs, "--set", "glga.window_frames=6")


def _run(
    benchmark: str,
    spec: Any,
    run: Callable,
    total: int,
    label: str,
    out: Path,
    task: str = "ladder",
    suffix: str = "",
) -> dict[str, Any]:
    """Check `spec`, print the start line, run it under a progress bar (`label`.format(what runs now))
    writing results into `out` after every record (an interrupted run keeps them); the results document."""
    from eflow.bench.results import collect_results, spec_environment
    from eflow.bench.tables import start_line

    spec.validate()
    params = spec.parameters()
    env = spec_environment(spec, shlex.join(["eflow", *sys.argv[1:]]))
    err_console.print(start_line(benchmark, env, params) + suffix)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        bar = progress.add_task(task, total=total)
        records = run(spec, on_start=lambda item: progress.update(bar, description=label.format(item)))
        return collect_results(out, benchmark, env, params, records, lambda: progress.advance(bar))


def _report(document: dict[str, Any], out: Path, plot: bool) -> None:
    """Print the table and notes of a results document, draw its plot, list the files."""
    from eflow.bench.plot import draw_plot, matplotlib_available, plot_name
    from eflow.bench.tables import results_view

    table, notes = results_view(document)
    console = Console()
    (console if console.is_terminal else Console(width=220)).print(table)  # a file or pipe: one line per row
    for note in notes:
        err_console.print(f"note: {note}")
    png = None
    if plot and not matplotlib_available():
        err_console.print("note: matplotlib is not installed (pip install 'eflow[plots]'); no plot drawn")
    elif plot:
        png = draw_plot(document, out / plot_name(document))
    typer.echo(f"  csv: {out / 'results.csv'}")
    typer.echo(f"  json: {out / 'results.json'}")
    if png is not None:
        typer.echo(f"  plot: {png}")


@bench_app.command("attention")
def attention(
    attn: Annotated[
        str | None,
        typer.Option(
            help=f"comma-separated backends; default: all registered ({choices('attention')}); "
            "LABEL=BACKEND adds a variant with its own --set LABEL.FIELD=VALUE options, e.g. "
            "softmax,softmax-flash=softmax --set softmax-flash.kernel=flash",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(
            help="token counts N, e.g. 8k,32k,125000 (k = 1,000; default 8k,32k,125k); grid: 30x52 per "
            "latent frame, T' = round(N / 1560) (smaller N: the 21x30x52 grid scaled down)",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    frames: Annotated[
        str | None,
        typer.Option(
            help="latent frames T' of a --size video, comma-separated (21 = 81 video frames)",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            help="video size: 480p (480x832), 720p (720x1280) or HxW pixels; H' = H/16, W' = W/16",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(
            help="explicit latent grids T'xH'xW', comma-separated, e.g. 21x30x52", rich_help_panel=SWEEP
        ),
    ] = None,
    drop: Annotated[
        str, typer.Option(help="token-drop ratios (sprint strategy), comma-separated", rich_help_panel=SWEEP)
    ] = "0,0.75",
    mode: Annotated[
        str, typer.Option(help="fwd, fwd+bwd (comma-separated)", rich_help_panel=SWEEP)
    ] = "fwd,fwd+bwd",
    scope: Annotated[
        str,
        typer.Option(
            help="attend: the backend's attend(q, k, v, ctx, x); layer: the module's forward (projections "
            "included) plus the backend's own FFN if it has one (Sana's Mix-FFN)",
            rich_help_panel=SWEEP,
        ),
    ] = "attend",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="backend option BACKEND.FIELD=VALUE (or LABEL.FIELD=VALUE for an --attn variant), e.g. "
            "glga.window_frames=6; repeatable",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    heads: Annotated[int, typer.Option(help="attention heads H", rich_help_panel=SHAPES)] = 12,
    head_dim: Annotated[int, typer.Option(help="head dimension d (D = H d)", rich_help_panel=SHAPES)] = 128,
    batch: Annotated[int, typer.Option(help="batch size B", rich_help_panel=SHAPES)] = 1,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32", rich_help_panel=SHAPES)
    ] = "auto",
    device: DeviceOption = "auto",
    warmup: Annotated[
        int, typer.Option(help="untimed calls first (compilation happens here)", rich_help_panel=TIMING)
    ] = 3,
    repeats: Annotated[
        int, typer.Option(help="timed calls; the median is reported", rich_help_panel=TIMING)
    ] = 10,
    check: Annotated[
        bool,
        typer.Option(
            help="check attend against a float64 CPU reference on a small grid first", rich_help_panel=TIMING
        ),
    ] = True,
    seed: Annotated[
        int, typer.Option(help="seed of inputs, weights and token selection", rich_help_panel=TIMING)
    ] = 0,
    out: Annotated[
        Path, typer.Option(help="writes results.csv, results.json, attention.png", rich_help_panel=OUTPUT)
    ] = Path("runs/bench/attention"),
    plot: Annotated[
        bool, typer.Option(help="draw attention.png (needs matplotlib)", rich_help_panel=OUTPUT)
    ] = True,
) -> None:
    """Time attention backends over token counts x drop ratios x modes; write a table, CSV, JSON and a plot."""
    from eflow.bench.attention import SweepSpec, parse_backends, run_sweep
    from eflow.bench.grids import split_list, sweep_grids
    from eflow.registry import get_registry

    with user_errors():
        backends, variants = parse_backends(
            split_list(attn) if attn is not None else get_registry("attention").names()
        )
        spec = SweepSpec(
            backends=backends,
            variants=variants,
            grids=sweep_grids(tokens, frames, size, grid),
            drops=_floats("--drop", drop),
            modes=split_list(mode),
            scope=scope,
            heads=heads,
            head_dim=head_dim,
            batch=batch,
            dtype=dtype,
            device=device,
            warmup=warmup,
            repeats=repeats,
            check=check,
            options=_backend_options(set_ or []),
            seed=seed,
        )
        label = "{0.backend} {0.tokens:,} tok, drop {0.drop:g}, {0.mode}"
        document = _run("attention", spec, run_sweep, spec.num_cells(), label, out, task="bench")
        _report(document, out, plot)


@bench_app.command("train")
def train_ladder(
    rung: Annotated[
        list[str] | None,
        typer.Option(
            help="rungs by name, comma-separated (default: fm-softmax, sfm, sfm-mva, +glga, +pdg, +drop), or one "
            "custom rung as KEY=VALUE pairs: name, base (a rung to start from), attn, objective, mva, "
            "mva_share, drop, token_drop, e.g. --rung 'name=mine,base=+pdg,drop=0.5'; repeatable",
            rich_help_panel=RUNGS,
        ),
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    grid: GridOption = None,
    tokens: TokensOption = None,
    autoencoder: AutoencoderOption = None,
    vae_path: VaePathOption = None,
    batch_size: Annotated[
        int | None, typer.Option(help="batch size (default: the config's, 8)", rich_help_panel=CONFIG)
    ] = None,
    set_: SetOption = None,
    ac: Annotated[
        str | None,
        typer.Option(
            help="activation checkpointing as in eflow train: off, full, selective", rich_help_panel=CONFIG
        ),
    ] = None,
    compile_: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile every block (online and EMA), as eflow train --compile; compilation falls in "
            "the warm-up steps",
            rich_help_panel=CONFIG,
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="timed optimizer steps per rung (median)", rich_help_panel=TIMING)
    ] = 10,
    warmup: Annotated[
        int, typer.Option(help="untimed steps first (compilation happens here)", rich_help_panel=TIMING)
    ] = 3,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    seed: SeedOption = 0,
    out: Annotated[
        Path, typer.Option(help="writes results.csv, results.json, train_ladder.png", rich_help_panel=OUTPUT)
    ] = Path("runs/bench/train"),
    plot: PlotOption = True,
) -> None:
    """Training throughput per rung (EFlow Fig. 4a): same preset, clip, batch and random data; it/s, MFU, passes."""
    from eflow.bench.ladder import ladder_base
    from eflow.bench.ladder_plot import TRAIN_LADDER
    from eflow.bench.train_ladder import TrainLadderSpec, run_train_ladder, train_rungs

    with user_errors():
        flags = dict(preset=preset, frames=frames, size=size, autoencoder=autoencoder, vae_path=vae_path)
        flags.update(batch_size=batch_size, ac=ac, compile_=compile_)
        base = ladder_base(config, flags, set_, grid, tokens)
        rungs = train_rungs(rung)
        spec = TrainLadderSpec(base, rungs, steps=steps, warmup=warmup, device=device, dtype=dtype, seed=seed)
        document = _run(TRAIN_LADDER, spec, run_train_ladder, len(rungs), "train {0.name}", out)
        _report(document, out, plot)


@bench_app.command("sample")
def sample_ladder(
    rung: Annotated[
        list[str] | None,
        typer.Option(
            help="rungs by name, comma-separated (default: fm-softmax-40x2, solution-softmax-4, "
            "solution-glga-4, solution-glga-1), or one custom rung as KEY=VALUE pairs: name, base, attn, sampler, steps, "
            "guidance, e.g. --rung 'name=glga-2,base=solution-glga-4,steps=2'; repeatable",
            rich_help_panel=RUNGS,
        ),
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    grid: GridOption = None,
    tokens: TokensOption = None,
    autoencoder: AutoencoderOption = None,
    vae_path: VaePathOption = None,
    random_vae: Annotated[
        bool,
        typer.Option(
            help="decode with a random-weight Wan 2.1 VAE (--autoencoder wan; needs diffusers): the decode's "
            "cost without the weights",
            rich_help_panel=CONFIG,
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="videos per sampler call", rich_help_panel=CONFIG)] = 1,
    set_: SetOption = None,
    repeats: Annotated[int, typer.Option(help="timed calls per rung (median)", rich_help_panel=TIMING)] = 3,
    warmup: Annotated[
        int, typer.Option(help="untimed calls first (compilation happens here)", rich_help_panel=TIMING)
    ] = 1,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    seed: SeedOption = 0,
    out: Annotated[
        Path, typer.Option(help="writes results.csv, results.json, sample_ladder.png", rich_help_panel=OUTPUT)
    ] = Path("runs/bench/sample"),
    plot: PlotOption = True,
) -> None:
    """Sampling latency per rung (EFlow Fig. 4b): diffusion and end-to-end (with decode) latency, NFE, speed-ups."""
    from eflow.bench.ladder import ladder_base
    from eflow.bench.ladder_plot import SAMPLE_LADDER
    from eflow.bench.sample_ladder import SampleLadderSpec, random_vae_layer, run_sample_ladder, sample_rungs

    with user_errors():
        with random_vae_layer(random_vae, autoencoder, vae_path) as extra:
            flags = dict(preset=preset, frames=frames, size=size, autoencoder=autoencoder, vae_path=vae_path)
            base = ladder_base(config, flags, set_, grid, tokens, extra)
            rungs = sample_rungs(rung)
            timing = dict(repeats=repeats, warmup=warmup, device=device, dtype=dtype, seed=seed)
            spec = SampleLadderSpec(base, rungs, batch=batch_size, **timing)
            suffix = " (random weights)" if random_vae else ""
            document = _run(
                SAMPLE_LADDER, spec, run_sample_ladder, len(rungs), "sample {0}", out, suffix=suffix
            )
        _report(document, out, plot)


@bench_app.command("plot")
def plot_command(
    results: Annotated[Path, typer.Argument(help="a directory holding results.json (or the file itself)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="PNG path, or a directory to write it in; default: attention.png, train_ladder.png or "
            "sample_ladder.png beside the results"
        ),
    ] = None,
) -> None:
    """Redraw the plot of a results.json (attention, train or sample ladder; e.g. one from a GPU machine)."""
    from eflow.bench.plot import draw_plot, matplotlib_available, plot_name
    from eflow.bench.results import read_results
    from eflow.errors import EflowError

    with user_errors():
        document = read_results(results)
        if not matplotlib_available():
            raise EflowError("matplotlib is not installed; pip install 'eflow[plots]' to draw plots")
        if out is not None and out.is_dir():
            out = out / plot_name(document)
        target = out or (results if results.is_dir() else results.parent) / plot_name(document)
        typer.echo(f"  plot: {draw_plot(document, target)}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
