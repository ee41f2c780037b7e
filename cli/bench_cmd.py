"""`eflow bench attention` (sweep backends x token counts x drop ratios x modes), `eflow bench train` and
`eflow bench sample` (the training and sampling ladders of EFlow Fig. 4) and `eflow bench plot`."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import apply_overrides, choices, config_layer

bench_app = typer.Typer(
    help="Benchmarks: time attention backends, the training and sampling ladders; plot the results.",
    no_args_is_help=True,
)

SWEEP, SHAPES, TIMING, OUTPUT = "What to sweep", "Shapes", "Timing", "Output"
RUNGS, CONFIG = "Rungs", "Config and clip"


def _floats(flag: str, text: str) -> list[float]:
    from eflow.bench.grids import split_list
    from eflow.errors import ConfigError

    try:
        return [float(part) for part in split_list(text)]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated numbers, e.g. 0,0.75") from None


def _backend_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """--set BACKEND.FIELD=VALUE pairs -> {backend: {field: value}} (values read as TOML)."""
    from eflow.config import parse_value
    from eflow.errors import ConfigError

    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        backend, dot, name = key.strip().partition(".")
        if not sep or not dot or not backend or not name:
            raise ConfigError(
                f"--set {pair!r}: expected BACKEND.FIELD=VALUE, e.g. --set glga.window_frames=6"
            )
        options.setdefault(backend, {})[name] = parse_value(value.strip())
    return options


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _check_cell(record: dict[str, Any]) -> str:
    if record["check"] is None:
        against = record["check_against"]
        return "off" if against == "off" else ("[red]error[/]" if against.startswith("error") else "-")
    text = f"{record['check']:.1e}"
    return f"[red]{text}[/]" if record["check"] > 1e-2 else text


def results_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of a sweep's records."""
    table = Table(title=title)
    for name in ("backend", "tokens", "grid", "drop", "M", "mode", "median ms", "1st call ms"):
        table.add_column(name, justify="left" if name in ("backend", "grid", "mode") else "right")
    for name in ("TF/s", "peak GB", "kernel", "check", "status"):
        table.add_column(name, justify="right" if name in ("TF/s", "peak GB", "check") else "left")
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"[red]{r['status']}[/]"
        table.add_row(
            r["backend"],
            f"{r['tokens']:,}",
            r["grid"],
            f"{r['drop']:g}",
            "-" if r["kept"] is None else f"{r['kept']:,}",
            r["mode"],
            _fmt(r["median_ms"], ".4g"),
            _fmt(r["first_call_ms"], ".4g"),
            _fmt(r["tflops"], ".1f" if (r["tflops"] or 0) >= 1 else ".3g"),
            _fmt(r["peak_gb"], ".3g"),
            r["kernel"],
            _check_cell(r),
            status,
        )
    return table


def _draw(document: dict[str, Any], path: Path) -> Path | None:
    from eflow.bench.plot import draw_latency_plot, matplotlib_available
    from eflow.errors import EflowError

    if not matplotlib_available():
        err_console.print("note: matplotlib is not installed (pip install 'eflow[plots]'); no plot drawn")
        return None
    try:
        return draw_latency_plot(document, path)
    except OSError as err:
        raise EflowError(f"cannot write the plot {path}: {err.strerror or err}") from None


@bench_app.command("attention")
def attention(
    attn: Annotated[
        str | None,
        typer.Option(
            help=f"comma-separated backends; default: all registered ({choices('attention')})",
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
            help="backend option BACKEND.FIELD=VALUE, e.g. glga.window_frames=6; repeatable",
            rich_help_panel=SWEEP,
        ),
    ] = None,
    heads: Annotated[int, typer.Option(help="attention heads H", rich_help_panel=SHAPES)] = 12,
    head_dim: Annotated[int, typer.Option(help="head dimension d (D = H d)", rich_help_panel=SHAPES)] = 128,
    batch: Annotated[int, typer.Option(help="batch size B", rich_help_panel=SHAPES)] = 1,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32", rich_help_panel=SHAPES)
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=TIMING)] = "auto",
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
    from eflow.assembly import resolve_device
    from eflow.bench.attention import SweepSpec, run_sweep
    from eflow.bench.grids import format_grid, split_list, sweep_grids
    from eflow.bench.plot import PLOT_NAME
    from eflow.bench.results import environment, write_results
    from eflow.registry import get_registry

    console = Console()
    if not console.is_terminal:  # a file or pipe: keep the wide table on one line per row
        console = Console(width=220)
    with user_errors():
        spec = SweepSpec(
            backends=split_list(attn) if attn is not None else get_registry("attention").names(),
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
        spec.validate()
        torch_device = resolve_device(device)
        env = environment(torch_device, spec.torch_dtype(torch_device), shlex.join(["eflow", *sys.argv[1:]]))
        err_console.print(
            f"{env['device_name']}, {env['dtype']}, grids: "
            + ", ".join(f"{format_grid(g)} ({g[0] * g[1] * g[2]:,} tokens)" for g in spec.grids)
        )
        records: list[dict[str, Any]] = []
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        with progress:
            task = progress.add_task("bench", total=spec.num_cells())

            def started(cell) -> None:
                progress.update(
                    task, description=f"{cell.backend} {cell.tokens:,} tok, drop {cell.drop:g}, {cell.mode}"
                )

            for record in run_sweep(spec, on_start=started):
                records.append(asdict(record))
                write_results(out, "attention", env, spec.parameters(), records)
                progress.advance(task)
        document = {"environment": env, "parameters": spec.parameters(), "results": records}
        title = f"attention ({spec.scope}) on {env['device_name']}, {records[0]['dtype']}"
        console.print(results_table(records, title))
        for note in dict.fromkeys(r["note"] for r in records if r["note"]):
            err_console.print(f"note: {note}")
        if any(r["check_against"] == "cpu fp64 attend" for r in records):
            err_console.print(
                "note: check = max |o - o_ref| / max |o_ref| against the module's own attend in float64 on "
                "the CPU where the backend has no reference() method"
            )
        png = _draw(document, out / PLOT_NAME) if plot else None
        typer.echo(f"  csv: {out / 'results.csv'}")
        typer.echo(f"  json: {out / 'results.json'}")
        if png is not None:
            typer.echo(f"  plot: {png}")


# ----- the training and sampling ladders (EFlow Fig. 4) ---------------------------------------------------
LADDER_FLAGS = {  # flag -> RunConfig field of the base config (--size -> data.height, data.width)
    "preset": "model.preset",
    "frames": "data.frames",
    "batch_size": "train.batch_size",
    "autoencoder": "data.autoencoder",
    "vae_path": "data.autoencoder_options.path",
}
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        help="a run.toml every rung starts from (e.g. configs/eflow-kinetics-xl.toml); flags and --set win",
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
        help="any base-config field, e.g. --set model.attention_options.window_frames=2",
        rich_help_panel=CONFIG,
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=TIMING)]
DtypeOption = Annotated[
    str,
    typer.Option(help="autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32", rich_help_panel=TIMING),
]
SeedOption = Annotated[int, typer.Option(help="seed of weights and random inputs", rich_help_panel=TIMING)]
PlotOption = Annotated[
    bool, typer.Option(help="draw the bar chart (needs matplotlib)", rich_help_panel=OUTPUT)
]


def _ladder_base(
    config: Path | None,
    flags: dict[str, Any],
    overrides: list[str],
    grid: str | None,
    tokens: str | None,
    extra: dict[str, Any] | None = None,
):
    """The base RunConfig of a ladder: defaults -> run.toml -> `extra` -> flags -> --set, on the given clip."""
    from eflow.bench.grids import grid_for_tokens, parse_grid, parse_token_count
    from eflow.bench.ladder import base_config
    from eflow.config import load_toml
    from eflow.errors import ConfigError

    ways = [flag for flag, value in (("--grid", grid), ("--tokens", tokens)) if value is not None]
    if flags.get("frames") is not None or flags.get("size") is not None:
        ways.append("--frames/--size")
    if len(ways) > 1:
        raise ConfigError(f"give the clip one way: {' or '.join(ways)}, not both")
    clip = parse_grid(grid) if grid else grid_for_tokens(parse_token_count(tokens)) if tokens else None
    layers = [load_toml(config)] if config is not None else []
    layers += [extra or {}, config_layer(flags, LADDER_FLAGS)]
    tree: dict[str, Any] = {}
    apply_overrides(tree, overrides)
    return base_config([*layers, tree], clip)


def _ladder_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=220)  # a file or pipe: one line per row


def _ladder_progress(total: int) -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    return progress, progress.add_task("ladder", total=total)


def _ladder_plot(document: dict[str, Any], out: Path) -> Path | None:
    from eflow.bench.ladder_plot import PLOT_NAMES, draw_ladder_plot
    from eflow.bench.plot import matplotlib_available
    from eflow.errors import EflowError

    if not matplotlib_available():
        err_console.print("note: matplotlib is not installed (pip install 'eflow[plots]'); no plot drawn")
        return None
    path = out / PLOT_NAMES[document["benchmark"]]
    try:
        return draw_ladder_plot(document, path)
    except OSError as err:
        raise EflowError(f"cannot write the plot {path}: {err.strerror or err}") from None


def _status(record: dict[str, Any]) -> str:
    return record["status"] if record["status"] == "ok" else f"[red]{record['status']}[/]"


def train_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of a training ladder's records."""
    table = Table(title=title)
    for name in ("rung", "attn", "objective"):
        table.add_column(name)
    for name in ("mva", "drop", "it/s", "samples/s", "ms/step", "warm-up s", "TFLOP/step", "TF/s", "MFU"):
        table.add_column(name, justify="right")
    table.add_column("passes fg/fn/wg/wn", justify="right")
    for name in ("peak GB", "speed-up"):
        table.add_column(name, justify="right")
    table.add_column("status")
    for r in records:
        passes = "/".join(f"{r['passes'][k]:.3g}" for k in r["passes"]) if r["passes"] else "-"
        table.add_row(
            r["rung"],
            r["attention"],
            r["objective"],
            f"{r['mva_share']:g}",
            f"{r['drop']:g}",
            _fmt(r["it_s"], ".4g"),
            _fmt(r["samples_s"], ".4g"),
            _fmt(r["median_ms"], ".4g"),
            _fmt(r["warmup_s"], ".3g"),
            _fmt(None if r["flops"] is None else r["flops"] / 1e12, ".4g"),
            _fmt(r["tflops"], ".3g"),
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            passes,
            _fmt(r["peak_gb"], ".3g"),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            _status(r),
        )
    return table


def sample_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of a sampling ladder's records."""
    table = Table(title=title)
    for name in ("rung", "attn", "sampler"):
        table.add_column(name)
    for name in ("steps", "NFE", "diffusion s", "decode s", "e2e s", "speed-up", "e2e speed-up"):
        table.add_column(name, justify="right")
    for name in ("1st call s", "TF/s", "MFU", "peak GB"):
        table.add_column(name, justify="right")
    table.add_column("status")
    for r in records:
        table.add_row(
            r["rung"],
            r["attention"],
            r["sampler"],
            str(r["steps"]),
            "-" if r["nfe"] is None else str(r["nfe"]),
            _fmt(r["diffusion_s"], ".4g"),
            _fmt(r["decode_s"], ".3g"),
            _fmt(r["e2e_s"], ".4g"),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if r["e2e_speedup"] is None else f"{r['e2e_speedup']:.2f}x",
            _fmt(r["first_call_s"], ".3g"),
            _fmt(r["tflops"], ".3g"),
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            _fmt(r["peak_gb"], ".3g"),
            _status(r),
        )
    return table


@bench_app.command("train")
def train_ladder(
    rung: Annotated[
        list[str] | None,
        typer.Option(
            help="rungs by name, comma-separated (default: fm-softmax,sfm,sfm-mva,+glga,+pdg,+drop), or one "
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
    from eflow.assembly import resolve_device
    from eflow.bench.ladder import autocast_dtype, parse_rungs
    from eflow.bench.ladder_plot import TRAIN_LADDER
    from eflow.bench.results import environment, write_results
    from eflow.bench.train_ladder import (
        DEFAULT_RUNG,
        RUNG_KEYS,
        TRAIN_RUNGS,
        TrainLadderSpec,
        run_train_ladder,
    )

    console = _ladder_console()
    with user_errors():
        flags = dict(
            preset=preset,
            frames=frames,
            size=size,
            batch_size=batch_size,
            autoencoder=autoencoder,
            vae_path=vae_path,
        )
        spec = TrainLadderSpec(
            base=_ladder_base(config, flags, set_ or [], grid, tokens),
            rungs=parse_rungs(rung, TRAIN_RUNGS, RUNG_KEYS, DEFAULT_RUNG),
            steps=steps,
            warmup=warmup,
            device=device,
            dtype=dtype,
            seed=seed,
        )
        spec.validate()
        params = spec.parameters()
        torch_device = resolve_device(device)
        env = environment(
            torch_device, autocast_dtype(dtype, torch_device), shlex.join(["eflow", *sys.argv[1:]])
        )
        err_console.print(
            f"{env['device_name']}, {env['dtype']}, preset {params['preset']}, {params['grid']} tokens "
            f"({params['tokens']:,}), clip {params['clip']}, batch {params['batch']}"
        )
        records: list[dict[str, Any]] = []
        progress, task = _ladder_progress(len(spec.rungs))
        with progress:
            started = lambda r: progress.update(task, description=f"train {r.name}")  # noqa: E731
            for record in run_train_ladder(spec, on_start=started):
                records.append(asdict(record))
                write_results(out, TRAIN_LADDER, env, params, records)
                progress.advance(task)
        document = {"benchmark": TRAIN_LADDER, "environment": env, "parameters": params, "results": records}
        title = (
            f"training ladder on {env['device_name']}: {params['preset']}, {params['grid']} tokens, "
            f"batch {params['batch']}, {records[0]['dtype']}"
        )
        console.print(train_table(records, title))
        err_console.print(
            "note: passes = forward passes per sample and step: full path with / without gradient (fg/fn), "
            "weak path with / without gradient (wg/wn); TFLOP/step counts forward x1, forward+backward x3"
        )
        png = _ladder_plot(document, out) if plot else None
        typer.echo(f"  csv: {out / 'results.csv'}")
        typer.echo(f"  json: {out / 'results.json'}")
        if png is not None:
            typer.echo(f"  plot: {png}")


@bench_app.command("sample")
def sample_ladder(
    rung: Annotated[
        list[str] | None,
        typer.Option(
            help="rungs by name, comma-separated (default: fm-softmax-40x2,solution-softmax-4,solution-glga-4,"
            "solution-glga-1), or one custom rung as KEY=VALUE pairs: name, base, attn, sampler, steps, "
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
    from contextlib import nullcontext

    from eflow.assembly import resolve_device
    from eflow.bench.ladder import autocast_dtype, parse_rungs
    from eflow.bench.ladder_plot import SAMPLE_LADDER
    from eflow.bench.results import environment, write_results
    from eflow.bench.sample_ladder import (
        DEFAULT_RUNG,
        RUNG_KEYS,
        SAMPLE_RUNGS,
        SampleLadderSpec,
        random_autoencoder,
        run_sample_ladder,
    )
    from eflow.errors import ConfigError

    console = _ladder_console()
    with user_errors():
        if random_vae and vae_path is not None:
            raise ConfigError("--random-vae and --vae-path contradict each other; pass one")
        flags = dict(preset=preset, frames=frames, size=size, autoencoder=autoencoder, vae_path=vae_path)
        with random_autoencoder(autoencoder or "pixel") if random_vae else nullcontext(None) as vae_options:
            extra = {"data": {"autoencoder_options": vae_options}} if vae_options else None
            spec = SampleLadderSpec(
                base=_ladder_base(config, flags, set_ or [], grid, tokens, extra),
                rungs=parse_rungs(rung, SAMPLE_RUNGS, RUNG_KEYS, DEFAULT_RUNG),
                batch=batch_size,
                repeats=repeats,
                warmup=warmup,
                device=device,
                dtype=dtype,
                seed=seed,
            )
            spec.validate()
            params = spec.parameters()
            torch_device = resolve_device(device)
            env = environment(
                torch_device, autocast_dtype(dtype, torch_device), shlex.join(["eflow", *sys.argv[1:]])
            )
            err_console.print(
                f"{env['device_name']}, {env['dtype']}, preset {params['preset']}, {params['grid']} tokens "
                f"({params['tokens']:,}), clip {params['clip']}, batch {params['batch']}, "
                f"decode: {params['autoencoder']}{' (random weights)' if random_vae else ''}"
            )
            records: list[dict[str, Any]] = []
            progress, task = _ladder_progress(len(spec.rungs))
            with progress:
                started = lambda what: progress.update(task, description=f"sample {what}")  # noqa: E731
                for record in run_sample_ladder(spec, on_start=started):
                    records.append(asdict(record))
                    write_results(out, SAMPLE_LADDER, env, params, records)
                    progress.advance(task)
        document = {"benchmark": SAMPLE_LADDER, "environment": env, "parameters": params, "results": records}
        title = (
            f"sampling ladder on {env['device_name']}: {params['preset']}, {params['grid']} tokens, "
            f"batch {params['batch']}, {records[0]['dtype']}"
        )
        console.print(sample_table(records, title))
        for note in dict.fromkeys(r["note"] for r in records if r["note"]):
            err_console.print(f"note: {note}")
        if params["autoencoder"] == "pixel":
            err_console.print(
                "note: the pixel autoencoder decodes for free; e2e = diffusion (see --random-vae)"
            )
        png = _ladder_plot(document, out) if plot else None
        typer.echo(f"  csv: {out / 'results.csv'}")
        typer.echo(f"  json: {out / 'results.json'}")
        if png is not None:
            typer.echo(f"  plot: {png}")


@bench_app.command("plot")
def plot_command(
    results: Annotated[Path, typer.Argument(help="a directory holding results.json (or the file itself)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="PNG path; default: attention.png, train_ladder.png or sample_ladder.png beside the results"
        ),
    ] = None,
) -> None:
    """Redraw the plot of a results.json (attention, train or sample ladder; e.g. one from a GPU machine)."""
    from eflow.bench.ladder_plot import PLOT_NAMES, draw_ladder_plot
    from eflow.bench.plot import PLOT_NAME, draw_latency_plot, matplotlib_available
    from eflow.bench.results import read_results
    from eflow.errors import EflowError

    with user_errors():
        document = read_results(results)
        if not matplotlib_available():
            raise EflowError("matplotlib is not installed; pip install 'eflow[plots]' to draw plots")
        ladder = document.get("benchmark") in PLOT_NAMES
        name = PLOT_NAMES[document["benchmark"]] if ladder else PLOT_NAME
        target = out or (results if results.is_dir() else results.parent) / name
        try:
            (draw_ladder_plot if ladder else draw_latency_plot)(document, target)
        except OSError as err:
            raise EflowError(f"cannot write the plot {target}: {err.strerror or err}") from None
        typer.echo(f"  plot: {target}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
