"""The latency plot of an attention benchmark, in the style of EFlow Fig. 2a.

Latency (median ms, log scale) against the token count N before dropping (log scale); one colour per
backend, a solid line for drop ratio 0 and dashed (then dotted, dash-dotted) lines for dropped-token runs;
one panel per mode (fwd, fwd+bwd); the title names the device, dtype and shapes. Only cells with status
"ok" are drawn. matplotlib is an optional extra (`pip install eflow[plots]`): `matplotlib_available()`
says whether a plot can be drawn at all. Drawn on a bare Figure with the Agg canvas, so no global
matplotlib state (pyplot, backend choice) is touched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from eflow.errors import EflowError

PLOT_NAME = "attention.png"
DROP_STYLES = ("--", ":", "-.")  # dropped-token runs, in order of increasing drop ratio


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_name(document: dict[str, Any]) -> str:
    """The PNG name of a results document: attention.png, train_ladder.png or sample_ladder.png."""
    from eflow.bench.ladder_plot import PLOT_NAMES

    return PLOT_NAMES.get(document.get("benchmark"), PLOT_NAME)


def draw_plot(document: dict[str, Any], path: Path) -> Path:
    """Draw any results document (an attention sweep's latency plot, a ladder's bar chart) at `path`."""
    from eflow.bench.ladder_plot import PLOT_NAMES, draw_ladder_plot

    draw = draw_ladder_plot if document.get("benchmark") in PLOT_NAMES else draw_latency_plot
    try:
        return draw(document, path)
    except OSError as err:
        raise EflowError(f"cannot write the plot {path}: {err.strerror or err}") from None


def plot_title(document: dict[str, Any]) -> str:
    """ "Attention latency: NVIDIA H100 80GB HBM3, bf16, attend, B=1, H=12, d=128"."""
    env, params = document.get("environment", {}), document.get("parameters", {})
    records = document.get("results") or [{}]
    dtype = records[0].get("dtype", params.get("dtype", "?"))
    return (
        f"Attention latency: {env.get('device_name', '?')}, {dtype}, {params.get('scope', 'attend')}, "
        f"B={params.get('batch', '?')}, H={params.get('heads', '?')}, d={params.get('head_dim', '?')}"
    )


def draw_latency_plot(document: dict[str, Any], path: Path) -> Path:
    """Draw the records of a results document (see eflow.bench.results) to a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in document["results"] if r.get("status") == "ok" and r.get("median_ms")]
    modes = list(dict.fromkeys(r["mode"] for r in document["results"])) or ["fwd"]
    backends = list(dict.fromkeys(r["backend"] for r in document["results"]))
    drops = sorted({float(r["drop"]) for r in document["results"]})
    colours = {name: f"C{i % 10}" for i, name in enumerate(backends)}
    dropped = [d for d in drops if d > 0]
    styles = {0.0: "-", **{d: DROP_STYLES[i % len(DROP_STYLES)] for i, d in enumerate(dropped)}}

    fig = Figure(figsize=(5.5 * len(modes), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for backend in backends:
            for drop in drops:
                points = sorted(
                    (r["tokens"], r["median_ms"])
                    for r in records
                    if r["mode"] == mode and r["backend"] == backend and float(r["drop"]) == drop
                )
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    styles[drop],
                    marker="o",
                    markersize=4,
                    color=colours[backend],
                    label=backend if drop == 0 else f"{backend}, drop {drop:g}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N (before dropping)")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no successful cells", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(plot_title(document), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
