"""`eflow plot RUN [RUN ...]`: training curves of runs from their metrics.jsonl, the runs overlaid.

One PNG per metric group, a panel per metric, against the optimizer step and, when the records carry
a wall-clock `time` (runs trained since it was recorded), against the time since the run's first
record in a second column (hours, or minutes or seconds for short runs; a pause before --resume
shows as a gap):

    loss.png         `loss` and the objective's own terms (loss_*), EMA-smoothed over the faint raw curve
    lr.png           the learning rate `lr`
    throughput.png   `it_s` (optimizer steps per second) and `data_wait_s`
    validation.png   val_* / val/* / eval_* / eval/* fields, when a run has any
    metrics.png      the fields asked for with --metric

The smoothing is TensorBoard's: a debiased EMA with factor `smooth` (default 0.6, as TensorBoard's; 0 = raw). matplotlib is the
optional `plots` extra; drawn on a bare Figure with the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eflow.atomic import atomic_path
from eflow.errors import ConfigError, EflowError
from eflow.run_dir import METRICS
from eflow.train.metrics import read_metrics

VALIDATION_PREFIXES = ("val_", "val/", "eval_", "eval/")


@dataclass
class RunCurves:
    """One run's records, by the name it has in the legend."""

    label: str
    records: list[dict[str, Any]]

    def series(self, key: str, hours: bool = False) -> tuple[list[float], list[float]]:
        """(x, y) of the records that have a finite `key`; x is the step, or hours since the first record."""
        start = next((r["time"] for r in self.records if "time" in r), None)
        xs, ys = [], []
        for record in self.records:
            value = record.get(key)
            if not _is_number(value) or not math.isfinite(value):
                continue
            if hours:
                if start is None or "time" not in record:
                    continue
                xs.append((record["time"] - start) / 3600)
            else:
                xs.append(record["step"])
            ys.append(float(value))
        return xs, ys

    @property
    def timed(self) -> bool:
        return any("time" in r for r in self.records)

    @property
    def hours(self) -> float:
        """Wall-clock hours from the first record to the last."""
        times = [r["time"] for r in self.records if "time" in r]
        return (times[-1] - times[0]) / 3600 if times else 0.0


# the wall-clock axis in the largest unit that the longest run fills: (name, hours per unit)
TIME_UNITS = (("hours", 1.0), ("minutes", 1 / 60), ("seconds", 1 / 3600))


def time_unit(runs: Sequence[RunCurves]) -> tuple[str, float]:
    longest = max(run.hours for run in runs)
    return next(((name, size) for name, size in TIME_UNITS if longest >= size), TIME_UNITS[-1])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl (a torn last line, from a crash, is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise EflowError(f"{run_dir} has no {METRICS}; give run directories written by `eflow train`")
    return [record for record in read_metrics(path) if _is_number(record.get("step"))]


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Legend names: the directories' names, or their paths where two names clash."""
    names = [Path(d).name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs, strict=True)]


def ema(values: Sequence[float], smooth: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); smooth = 0 returns the values."""
    out, mean = [], 0.0
    for i, value in enumerate(values):
        mean = smooth * mean + (1 - smooth) * value
        out.append(mean / (1 - smooth ** (i + 1)) if smooth > 0 else value)
    return out


def metric_groups(keys: Iterable[str], extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Group name -> the metrics drawn in it, of those present in `keys` (empty groups left out)."""
    keys = set(keys)
    groups = {
        "loss": ["loss", *sorted(k for k in keys if k.startswith(("loss_", "loss/")))],
        "lr": ["lr"],
        "throughput": ["it_s", "data_wait_s"],
        "validation": sorted(k for k in keys if k.startswith(VALIDATION_PREFIXES)),
        "metrics": list(dict.fromkeys(extra)),
    }
    present = {group: [k for k in names if k in keys] for group, names in groups.items()}
    return {group: names for group, names in present.items() if names}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EflowError("eflow plot needs matplotlib: pip install 'eflow[plots]'") from None


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    smooth: float = 0.6,
    metrics: Sequence[str] = (),
) -> dict[str, Path]:
    """Draw the runs' curves, one PNG per metric group, into `out_dir` (default: FIRST_RUN/plots);
    returns group -> path."""
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    if not 0 <= smooth < 1:
        raise ConfigError(f"--smooth {smooth}: give an EMA factor in [0, 1) (0 = no smoothing)")
    require_matplotlib()
    run_dirs = [Path(d) for d in run_dirs]
    runs = [RunCurves(label, read_run(d)) for label, d in zip(run_labels(run_dirs), run_dirs, strict=True)]
    keys = {k for run in runs for record in run.records for k, v in record.items() if _is_number(v)}
    unknown = [m for m in metrics if m not in keys]
    if unknown:
        known = ", ".join(sorted(keys - {"step", "time"}))
        raise ConfigError(f"--metric {', '.join(unknown)}: no run records it; fields: {known}")
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return {
            group: draw_group(
                runs, group, names, out_dir / f"{group}.png", smooth if group == "loss" else 0.0
            )
            for group, names in metric_groups(keys, metrics).items()
        }
    except OSError as err:
        raise EflowError(f"cannot write plots to --out {out_dir}: {err.strerror or err}") from None


def draw_group(
    runs: Sequence[RunCurves], group: str, names: Sequence[str], path: Path, smooth: float
) -> Path:
    """One PNG: a row per metric in `names`; columns: against steps, and against hours if runs are timed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes_x = ["step", "time"] if any(run.timed for run in runs) else ["step"]
    unit, unit_hours = time_unit(runs)
    fig = Figure(figsize=(5.5 * len(axes_x), 2.8 * len(names) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(names), len(axes_x), squeeze=False, sharex="col")
    for row, name in enumerate(names):
        for col, x_name in enumerate(axes_x):
            ax = grid[row][col]
            for i, run in enumerate(runs):
                xs, ys = run.series(name, hours=x_name == "time")
                if not xs:
                    continue
                if x_name == "time":
                    xs = [x / unit_hours for x in xs]
                colour = f"C{i % 10}"
                if smooth > 0:
                    ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                    ax.plot(xs, ema(ys, smooth), color=colour, linewidth=1.4, label=run.label)
                else:
                    ax.plot(xs, ys, color=colour, linewidth=1.2, label=run.label)
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
            if row == len(names) - 1:
                ax.set_xlabel("optimizer step" if x_name == "step" else f"{unit} (wall clock)")
    handles, labels = grid[0][0].get_legend_handles_labels()
    if handles:
        grid[0][-1].legend(handles, labels, fontsize=8)
    title = group if smooth == 0 else f"{group} (EMA {smooth:g} over raw)"
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
