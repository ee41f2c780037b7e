"""A table's results from its run directories: the document (results.json), rich tables and a chart.

Everything is read from disk (checkpoints, metrics.jsonl, eval files, repro_sessions.json), so a table
completed over several sittings, or by child processes, reads the same. Per row:

    status      done | trained, not evaluated | partial: step k of n | not run | error: ...
    scale       steps asked and trained, batch, clips seen (steps x batch), tokens per clip, the mean
                share of tokens the middle stack kept, parameters, training seconds (the sum of step
                times in metrics.jsonl; gpu_seconds as well when every sitting ran on one CUDA device),
                model FLOPs counted while training and predicted per step, how the steps were chosen
    eval        FVD under its label, sample class accuracy, sampler, sampling steps, guidance, N
    paper       the paper's columns and FVD, and where the row is defined

Claims (tables.Claim) are evaluated on the paper's FVDs and on ours; "n/a" while a row is missing.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from eflow.atomic import atomic_path, atomic_write_text
from eflow.errors import EflowError
from eflow.repro.accounting import model_facts, read_sessions, training_totals
from eflow.repro.tables import PAPER_BATCH, PAPER_CLIP, claim_holds, claim_value

RESULTS = "results.json"


def build_document(plans: list, spec, errors: dict[str, str], command: str = "") -> dict[str, Any]:
    """The table's results document (module docstring) from the plans of every row."""
    from eflow import __version__
    from eflow.repro.runner import is_evaluated, read_eval, saved_differences, trained_step

    table = plans[0].table
    rows = []
    for p in plans:
        step = trained_step(p.run_dir)
        differences = saved_differences(p)
        evaluated = is_evaluated(p, spec, step) and not differences
        if p.row.name in errors:
            status = f"error: {errors[p.row.name]}"
        elif differences:
            status = f"other configuration in {p.run_dir} ({'; '.join(differences[:2])})"
        elif evaluated:
            status = "done"
        elif step is None:
            status = "not run"
        elif step < p.steps:
            status = f"partial: step {step} of {p.steps}"
        elif step == p.steps:
            status = "trained, not evaluated"
        else:
            status = f"at step {step}, beyond the {p.steps} asked"
        rows.append(_row_record(p, step, read_eval(p) if evaluated else None, status))
    ours = {r["row"]: (r["eval"] or {}).get("fvd") for r in rows}
    paper = {r["row"]: r["paper"]["fvd"] for r in rows}
    claims = []
    for claim in table.claims:
        claims.append(
            {
                "claim": claim.text,
                "lower": claim.lower,
                "higher": claim.higher,
                "paper": _side_values(claim, paper),
                "ours": _side_values(claim, ours),
            }
        )
    labels = sorted({r["eval"]["metric_label"] for r in rows if r["eval"]})
    return {
        "table": table.name,
        "title": table.title,
        "source": table.source,
        "paper": {
            "model": table.preset,
            "iterations": table.iterations,
            "batch": PAPER_BATCH,
            "clip": PAPER_CLIP,
            "data": "Kinetics-700, class-conditional",
            "metric": "FVD (I3D features, Kinetics-700)",
        },
        "ours": {
            "metric": ", ".join(labels) or None,
            "comparable_to_paper": False,
            "scale": {k: v for k, v in spec.scale(table).items() if v is not None},
            "config": spec.config,
            "set": list(spec.sets),
            "match": spec.match,
            "eval_num": spec.eval_num,
        },
        "rows": rows,
        "claims": claims,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "eflow_version": __version__,
        "host": platform.node(),
    }


def _side_values(claim, fvd: dict[str, float | None]) -> dict[str, Any]:
    return {
        "lower": claim_value(claim.lower, fvd),
        "higher": claim_value(claim.higher, fvd),
        "holds": claim_holds(claim, fvd),
    }


def _row_record(p, step: int | None, report: dict[str, Any] | None, status: str) -> dict[str, Any]:
    cfg, row = p.cfg, p.row
    facts = model_facts(cfg, p.run_dir)
    totals = training_totals(p.run_dir, step) if step else {}
    sessions = read_sessions(p.run_dir)
    devices = sorted({s.get("device", "?") for s in sessions})
    on_cuda = bool(devices) and all(d.startswith("cuda") for d in devices)
    seconds = totals.get("train_seconds")
    stage0 = cfg.schedule.stages[0]
    record: dict[str, Any] = {
        "row": row.name,
        "label": row.label,
        "status": status,
        "run_dir": str(p.run_dir),
        "eval_file": str(p.eval_path),
        "flags": row.flags,
        "nfe": row.nfe,
        "config": {
            "preset": cfg.model.preset,
            "attention": cfg.model.attention,
            "attention_options": cfg.model.attention_options,
            "objective": cfg.objective.name,
            "mva": bool(cfg.objective.options.get("mva", False)),
            "token_drop": cfg.token_drop.name,
            "stages": [s.model_dump() for s in cfg.schedule.stages],
            "data": f"{cfg.data.name} {cfg.data.frames}x{cfg.data.height}x{cfg.data.width}",
        },
        "scale": {
            "steps": p.steps,
            "trained_step": step,
            "steps_rule": p.steps_rule,
            "batch_size": cfg.train.batch_size,
            "clips_seen": (step or 0) * cfg.train.batch_size,
            **facts,
            "middle_keep": totals.get("middle_keep"),
            "drop_first_stage": stage0.drop_ratio if cfg.token_drop.name != "none" else 0.0,
            "train_seconds": seconds,
            "gpu_seconds": seconds if on_cuda else None,
            "devices": devices,
            "concurrent_rows": max((s.get("concurrent_rows", 1) for s in sessions), default=None),
            "model_flops": totals.get("model_flops"),
            "predicted_flops_per_step": p.predicted_flops,
        },
        "eval": None,
        "paper": {"columns": row.paper, "fvd": row.paper_fvd, "source": row.source},
    }
    if totals.get("extrapolated"):
        record["scale"]["extrapolated"] = totals["extrapolated"]
    if report is not None:
        metrics, sampling = report.get("metrics", {}), report.get("sampling", {})
        record["eval"] = {
            "metric_label": report.get("metric_label"),
            "fvd": metrics.get("fvd"),
            "accuracy": metrics.get("accuracy"),
            "sampler": sampling.get("sampler"),
            "steps": sampling.get("steps"),
            "guidance": sampling.get("guidance"),
            "n": (report.get("fvd") or {}).get("n_fake") or (report.get("accuracy") or {}).get("n"),
            "seconds": (report.get("timing_s") or {}).get("total"),
        }
    return record


# ----- output --------------------------------------------------------------------------------------------
def write_outputs(document: dict[str, Any], table_dir: Path) -> list[Path]:
    """results.json and (with matplotlib) TABLE.png in `table_dir`; returns the files written."""
    table_dir = Path(table_dir)
    try:
        written = [atomic_write_text(table_dir / RESULTS, json.dumps(document, indent=2) + "\n")]
    except OSError as err:
        raise EflowError(f"cannot write {table_dir / RESULTS}: {err.strerror or err}") from None
    chart = draw_chart(document, table_dir / f"{document['table']}.png")
    if chart is not None:
        written.append(chart)
    return written


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rich_tables(document: dict[str, Any]) -> list[RichTable]:
    """The rows (paper beside ours) and the claims, for printing."""
    ours_label = document["ours"]["metric"] or "FVD (ours)"
    rows = RichTable(title=document["title"], title_justify="left")
    for name in (
        "row", "NFE", "steps", "tokens/clip", "clips seen", "train s", "model FLOPs", "paper FVD", ours_label,
        "class acc.", "status",
    ):  # fmt: skip
        rows.add_column(name, justify="left" if name in ("row", "status") else "right")
    for r in document["rows"]:
        s, e = r["scale"], r["eval"] or {}
        rows.add_row(
            f"{r['row']} {r['label']}" if r["label"] != r["row"] else r["row"],
            str(r["nfe"]),
            f"{s['trained_step'] or 0}/{s['steps']}",
            str(s["tokens_per_clip"]),
            str(s["clips_seen"]),
            _num(s["train_seconds"], ".0f"),
            _num(s["model_flops"], ".3g"),
            _num(r["paper"]["fvd"], ".1f"),
            _num(e.get("fvd"), ".2f"),
            _num(e.get("accuracy"), ".3f"),
            r["status"],
        )
    claims = RichTable(title="claims (FVD, lower is better)", title_justify="left")
    for name in ("claim", "paper", "ours"):
        claims.add_column(name)
    for c in document["claims"]:
        claims.add_row(c["claim"], _holds_text(c["paper"], ".1f"), _holds_text(c["ours"], ".4g"))
    return [rows, claims]


def _holds_text(side: dict[str, Any], fmt: str) -> str:
    if side["holds"] is None:
        return "n/a"
    mark = "holds" if side["holds"] else "does not hold"
    return f"{mark} ({format(side['lower'], fmt)} vs {format(side['higher'], fmt)})"


def draw_chart(document: dict[str, Any], path: Path) -> Path | None:
    """Paper FVD, our FVD and our class accuracy per row, side by side (separate axes: the FVDs are of
    different feature spaces); None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    records = document["rows"]
    names = [r["row"] for r in records]
    panels = [
        ("paper FVD (I3D, Kinetics-700)", [r["paper"]["fvd"] for r in records], "tab:gray", "%.1f"),
        (f"ours: {document['ours']['metric'] or 'FVD'}", [(r["eval"] or {}).get("fvd") for r in records], "tab:orange", "%.2f"),
        ("ours: sample class accuracy", [(r["eval"] or {}).get("accuracy") for r in records], "tab:blue", "%.3f"),
    ]  # fmt: skip
    fig = Figure(figsize=(4.2 * len(panels), max(2.6, 0.42 * len(names) + 1.4)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True)
    ys = list(range(len(names)))
    for ax, (title, values, colour, fmt) in zip(axes, panels, strict=True):
        shown = [(y, v) for y, v in zip(ys, values, strict=True) if v is not None]
        bars = ax.barh([y for y, _ in shown], [v for _, v in shown], color=colour)
        ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
        for y, v in zip(ys, values, strict=True):
            if v is None:
                ax.text(0, y, " n/a", va="center", fontsize=8, color="0.4")
        ax.set_title(title + ("" if "accuracy" in title else " (lower is better)"), fontsize=9)
        ax.margins(x=0.2)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys, names)
    axes[0].invert_yaxis()
    scale = document["ours"]["scale"]
    fig.suptitle(
        f"{document['title']}\nours: {scale.get('preset')}, {scale.get('steps', 'default')} steps, "
        f"{document['ours']['match']}-matched; not comparable to the paper's FVD",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    except OSError as err:
        raise EflowError(f"cannot write {path}: {err.strerror or err}") from None
    return path
