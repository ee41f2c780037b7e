"""Bar charts of the training and sampling ladders, in the style of EFlow Fig. 4a / 4b.

One bar per rung, in ladder order: it/s for `eflow bench train` (results.json "benchmark":
"train-ladder"); diffusion and end-to-end latency side by side for `eflow bench sample`
("sample-ladder"). The speed-up over the first rung is written on each bar ("1.00x", "2.47x"); a rung
that failed gets its status ("oom") where its bar would stand. Drawn on a bare Figure with the Agg
canvas (no pyplot state), like eflow.bench.plot; matplotlib is the optional `plots` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN_LADDER, SAMPLE_LADDER = "train-ladder", "sample-ladder"
PLOT_NAMES = {TRAIN_LADDER: "train_ladder.png", SAMPLE_LADDER: "sample_ladder.png"}
# benchmark -> (bars: (value field, speed-up field, legend label), y-axis label, title)
BARS = {
    TRAIN_LADDER: (
        [("it_s", "speedup", "it/s")],
        "training throughput (it/s, median)",
        "Training throughput",
    ),
    SAMPLE_LADDER: (
        [("diffusion_s", "speedup", "diffusion"), ("e2e_s", "e2e_speedup", "end to end (with decode)")],
        "latency (s, median)",
        "Sampling latency",
    ),
}


def ladder_title(document: dict[str, Any], what: str) -> str:
    """ "Training throughput, NVIDIA H200" over "XL, 21x30x52 tokens, batch 2, bfloat16" (two lines)."""
    env, params = document.get("environment", {}), document.get("parameters", {})
    return (
        f"{what}, {env.get('device_name', '?')}\n{params.get('preset', '?')}, {params.get('grid', '?')} "
        f"tokens, batch {params.get('batch', '?')}, {env.get('dtype', '?')}"
    )


def draw_ladder_plot(document: dict[str, Any], path: Path) -> Path:
    """Draw a ladder's results document (eflow.bench.results) as a bar chart PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars, ylabel, what = BARS[document["benchmark"]]
    records = document["results"]
    fig = Figure(figsize=(max(6.0, 1.3 * len(records) + 1.5), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(bars)
    for i, (field, speed_field, label) in enumerate(bars):
        xs = [k + (i - (len(bars) - 1) / 2) * width for k in range(len(records))]
        heights = [r.get(field) or 0.0 for r in records]
        drawn = ax.bar(xs, heights, width * 0.95, color=f"C{i}", label=label)
        for bar, record in zip(drawn, records, strict=True):
            if record.get("status") != "ok":
                text = record.get("status", "?").split(":")[0]
            else:
                text = "-" if record.get(speed_field) is None else f"{record[speed_field]:.2f}x"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(records)), [r["rung"] for r in records], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    if len(bars) > 1:
        ax.legend(fontsize=8)
    fig.suptitle(ladder_title(document, what), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
