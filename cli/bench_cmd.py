"""`eflow bench attention` (sweep backends x token counts x drop ratios x modes) and `eflow bench plot`."""

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
from eflow.cli.options import choices

bench_app = typer.Typer(help="Benchmarks: time attention backends, plot the results.", no_args_is_help=True)

SWEEP, SHAPES, TIMING, OUTPUT = "What to sweep", "Shapes", "Timing", "Output"


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


@bench_app.command("plot")
def plot_command(
    results: Annotated[Path, typer.Argument(help="a directory holding results.json (or the file itself)")],
    out: Annotated[
        Path | None, typer.Option(help="PNG path; default: attention.png beside the results")
    ] = None,
) -> None:
    """Redraw the latency plot from a results.json (e.g. one written on a GPU machine without matplotlib)."""
    from eflow.bench.plot import PLOT_NAME, draw_latency_plot, matplotlib_available
    from eflow.bench.results import read_results
    from eflow.errors import EflowError

    with user_errors():
        document = read_results(results)
        if not matplotlib_available():
            raise EflowError("matplotlib is not installed; pip install 'eflow[plots]' to draw plots")
        target = out or (results if results.is_dir() else results.parent) / PLOT_NAME
        try:
            draw_latency_plot(document, target)
        except OSError as err:
            raise EflowError(f"cannot write the plot {target}: {err.strerror or err}") from None
        typer.echo(f"  plot: {target}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
