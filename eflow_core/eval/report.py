"""eval.json (written atomically), the tables `eflow eval` prints, and `eflow eval compare`'s table and chart.

An FVD is always shown under its label ("in-domain FVD", "FVD (I3D)", ...), never as a bare "FVD",
and the comparison puts each label in its own column, so numbers from different feature spaces never
share a column or a chart. `protocol_differences` lists the protocol fields on which compared runs
disagree (extractor hash, N, covariance, clip shape, real data, sampler settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from eflow.atomic import atomic_write_text
from eflow.errors import EflowError

EVAL_FILE = "eval.json"
ACCURACY_LABEL = "sample class accuracy"


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write the report as indented JSON, atomically."""
    try:
        return atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise EflowError(f"cannot write {path}: {err.strerror or err}") from None


def read_report(path_or_run: str | Path) -> tuple[str, dict[str, Any]]:
    """(a display name, the report) from a run directory (its eval.json) or an eval.json path."""
    path = Path(path_or_run)
    file = path / EVAL_FILE if path.is_dir() else path
    if not file.is_file():
        raise EflowError(f"{file} not found; run `eflow eval {path}` first")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise EflowError(f"{file} is not valid JSON ({err}); rerun `eflow eval`") from None
    if not isinstance(report, dict) or "metrics" not in report:
        raise EflowError(f"{file} is not an eflow eval.json (no 'metrics')")
    return str(path), report


def metric_columns(report: dict[str, Any]) -> dict[str, float]:
    """{column label: value}: the FVD under its label, accuracy as ACCURACY_LABEL."""
    out = {}
    if "fvd" in report:
        out[report["fvd"]["label"]] = float(report["fvd"]["value"])
    if "accuracy" in report:
        out[ACCURACY_LABEL] = float(report["accuracy"]["value"])
    return out


def eval_tables(report: dict[str, Any]) -> list[Table]:
    """The summary table (metric, value, protocol) and, with accuracy, the per-class table."""
    s, clip = report["sampling"], report["clip"]
    title = f"{report['run']['dir']} (step {report['run']['step']}): " + ", ".join(metric_columns(report))
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("protocol")
    if "fvd" in report:
        f = report["fvd"]
        ex = f["extractor"]
        note = "" if f["comparable_to_published_fvd"] else "; not comparable with published FVD"
        eps = f"; eps {f['eps_added']:g} added to the covariances" if f["eps_added"] else ""
        dim = f.get("feature_dim")  # reports written before it was recorded lack it
        if dim is not None and min(f["n_real"], f["n_fake"]) <= dim:
            eps += (
                f"; [yellow]unreliable: {min(f['n_real'], f['n_fake'])} clips for {dim}-dimensional "
                f"features make the covariances singular; use --num {dim + 1} or more (several times {dim})[/]"
            )
        table.add_row(
            f["label"],
            f"{f['value']:.2f}",
            f"{ex['name']} {ex['content_hash'][:19]}, {ex['protocol'].get('frames')} frames, "
            f"{ex['protocol'].get('resolution')}; N real {f['n_real']} ({f['real']['dataset']}), "
            f"N fake {f['n_fake']}; covariance {f['covariance']}{eps}{note}",
        )
    if "accuracy" in report:
        a = report["accuracy"]
        table.add_row(
            ACCURACY_LABEL,
            f"{a['value']:.3f}",
            f"{a['n']} clips, classes in turn; in-domain classifier (held-out accuracy "
            f"{a['classifier']['heldout_accuracy']:.3f})",
        )
    table.caption = (
        f"{s['sampler']}, {s['steps']} steps, w={s['guidance']}, seed {s['seed']}, "
        f"{clip['frames']}x{clip['height']}x{clip['width']} clips, {s['device']} {s['precision']}"
    )
    tables = [table]
    if "accuracy" in report:
        per = Table(title="accuracy per class", title_justify="left")
        per.add_column("class")
        per.add_column("accuracy", justify="right")
        per.add_column("clips", justify="right")
        for name, row in report["accuracy"]["per_class"].items():
            per.add_row(name, f"{row['accuracy']:.3f}", str(row["n"]))
        tables.append(per)
    return tables


def compare_table(reports: list[tuple[str, dict[str, Any]]]) -> Table:
    """Rows = runs, columns = metrics (each FVD label its own column) plus the sampling settings."""
    columns: list[str] = []
    for _, report in reports:
        columns += [c for c in metric_columns(report) if c not in columns]
    table = Table(title="eval compare", title_justify="left")
    table.add_column("run")
    for c in columns:
        table.add_column(c, justify="right")
    for c in ("step", "steps", "w", "N fake"):
        table.add_column(c, justify="right")
    for name, report in reports:
        values = metric_columns(report)
        cells = [
            "-" if c not in values else (f"{values[c]:.3f}" if c == ACCURACY_LABEL else f"{values[c]:.2f}")
            for c in columns
        ]
        n_fake = report.get("fvd", {}).get("n_fake", report.get("accuracy", {}).get("n", "-"))
        s = report["sampling"]
        table.add_row(
            name, *cells, str(report["run"]["step"]), str(s["steps"]), f"{s['guidance']:g}", str(n_fake)
        )
    return table


def protocol_differences(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Protocol fields that differ between the reports (empty: they compare like with like)."""

    def fields(report: dict[str, Any]) -> dict[str, Any]:
        f = report.get("fvd", {})
        return {
            "extractor": (f.get("extractor", {}).get("name"), f.get("extractor", {}).get("content_hash")),
            "extractor protocol": f.get("extractor", {}).get("protocol"),
            "N real": f.get("n_real"),
            "N fake": f.get("n_fake"),
            "covariance": f.get("covariance"),
            "real data": (f.get("real", {}).get("dataset"), f.get("real", {}).get("dataset_options")),
            "clip": report.get("clip"),
            "classifier": report.get("accuracy", {}).get("classifier", {}).get("content_hash"),
        }

    rows = [fields(r) for _, r in reports]
    return [key for key in rows[0] if any(row[key] != rows[0][key] for row in rows[1:])]


def compare_chart(reports: list[tuple[str, dict[str, Any]]], out: Path) -> Path | None:
    """A bar chart PNG, one panel per metric column; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns: list[str] = []
    for _, report in reports:
        columns += [c for c in metric_columns(report) if c not in columns]
    if not columns:
        raise EflowError("the eval.json files hold no metrics to chart")
    names = [name for name, _ in reports]
    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 1.2 * len(names) + 2) * len(columns), 3.6))
    axes = [axes] if len(columns) == 1 else list(axes)
    for ax, column in zip(axes, columns, strict=True):
        values = [metric_columns(r).get(column) for _, r in reports]
        xs = [i for i, v in enumerate(values) if v is not None]
        bars = ax.bar(
            xs, [values[i] for i in xs], color="tab:blue" if column == ACCURACY_LABEL else "tab:orange"
        )
        ax.bar_label(bars, fmt="%.3f" if column == ACCURACY_LABEL else "%.2f", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        lower = "higher is better" if column == ACCURACY_LABEL else "lower is better"
        ax.set_title(f"{column} ({lower})", fontsize=10)
        if column == ACCURACY_LABEL:
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    from eflow.atomic import atomic_path

    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=120)
    except OSError as err:
        raise EflowError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return out
