"""What `eflow bench` prints: the line before a run, and a results document's table and notes after it.

One place for the attention sweep ("benchmark": "attention") and the training and sampling ladders
("train-ladder", "sample-ladder"), so that a results.json (eflow.bench.results) shows the same from
Python as on the command line: `table, notes = results_view(read_results(path))`.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from eflow.bench.ladder_plot import SAMPLE_LADDER, TRAIN_LADDER

ATTENTION = "attention"
LADDER_TITLES = {TRAIN_LADDER: "training ladder", SAMPLE_LADDER: "sampling ladder"}
CHECK_NOTE = (
    "check = max |o - o_ref| / max |o_ref| against the module's own attend in float64 on the CPU where the "
    "backend has no reference() method"
)
PASSES_NOTE = (
    "passes = forward passes per sample and step: full path with / without gradient (fg/fn), weak path "
    "with / without gradient (wg/wn); TFLOP/step counts forward x1, forward+backward x3"
)
PIXEL_NOTE = "the pixel autoencoder decodes for free; e2e = diffusion (see --random-vae)"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _status(record: dict[str, Any]) -> str:
    return record["status"] if record["status"] == "ok" else f"[red]{record['status']}[/]"


def _check_cell(record: dict[str, Any]) -> str:
    if record["check"] is None:
        against = record["check_against"]
        return "off" if against == "off" else ("[red]error[/]" if against.startswith("error") else "-")
    text = f"{record['check']:.1e}"
    return f"[red]{text}[/]" if record["check"] > 1e-2 else text


def _table(title: str, text: tuple[str, ...], numbers: tuple[str, ...]) -> Table:
    """A table of text columns (left-aligned), number columns (right-aligned), then the status."""
    table = Table(title=title)
    for name in text:
        table.add_column(name)
    for name in numbers:
        table.add_column(name, justify="right")
    table.add_column("status")
    return table


def attention_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of an attention sweep's records."""
    table = Table(title=title)
    for name in ("backend", "tokens", "grid", "drop", "M", "mode", "median ms", "1st call ms"):
        table.add_column(name, justify="left" if name in ("backend", "grid", "mode") else "right")
    for name in ("TF/s", "peak GB", "kernel", "check", "status"):
        table.add_column(name, justify="right" if name in ("TF/s", "peak GB", "check") else "left")
    for r in records:
        table.add_row(
            r["backend"],
            f"{r['tokens']:,}",
            r["grid"],
            f"{r['drop']:g}",
            "-" if r["kept"] is None else f"{r['kept']:,}",
            r["mode"],
            fmt(r["median_ms"], ".4g"),
            fmt(r["first_call_ms"], ".4g"),
            fmt(r["tflops"], ".1f" if (r["tflops"] or 0) >= 1 else ".3g"),
            fmt(r["peak_gb"], ".3g"),
            r["kernel"],
            _check_cell(r),
            _status(r),
        )
    return table


def train_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of a training ladder's records."""
    numbers = ("mva", "drop", "it/s", "samples/s", "ms/step", "warm-up s", "TFLOP/step", "TF/s", "MFU")
    table = _table(
        title, ("rung", "attn", "objective"), (*numbers, "passes fg/fn/wg/wn", "peak GB", "speed-up")
    )
    for r in records:
        passes = "/".join(f"{r['passes'][k]:.3g}" for k in r["passes"]) if r["passes"] else "-"
        flops = None if r["flops"] is None else r["flops"] / 1e12
        cells = [r["rung"], r["attention"], r["objective"], f"{r['mva_share']:g}", f"{r['drop']:g}"]
        cells += [fmt(r[key], ".4g") for key in ("it_s", "samples_s", "median_ms")]
        cells += [fmt(r["warmup_s"], ".3g"), fmt(flops, ".4g"), fmt(r["tflops"], ".3g"), _percent(r["mfu"])]
        table.add_row(*cells, passes, fmt(r["peak_gb"], ".3g"), _times(r["speedup"]), _status(r))
    return table


def sample_table(records: list[dict[str, Any]], title: str) -> Table:
    """The rich table of a sampling ladder's records."""
    numbers = ("steps", "NFE", "diffusion s", "decode s", "e2e s", "speed-up", "e2e speed-up")
    table = _table(title, ("rung", "attn", "sampler"), (*numbers, "1st call s", "TF/s", "MFU", "peak GB"))
    for r in records:
        cells = [r["rung"], r["attention"], r["sampler"], str(r["steps"])]
        cells += ["-" if r["nfe"] is None else str(r["nfe"]), fmt(r["diffusion_s"], ".4g")]
        cells += [fmt(r["decode_s"], ".3g"), fmt(r["e2e_s"], ".4g"), _times(r["speedup"])]
        cells += [_times(r["e2e_speedup"]), fmt(r["first_call_s"], ".3g"), fmt(r["tflops"], ".3g")]
        table.add_row(*cells, _percent(r["mfu"]), fmt(r["peak_gb"], ".3g"), _status(r))
    return table


def start_line(benchmark: str, env: dict[str, Any], params: dict[str, Any]) -> str:
    """The line printed before a run: the device, the dtype and the shapes measured."""
    head = f"{env['device_name']}, {env['dtype']}"
    if benchmark == ATTENTION:
        sizes = [_tokens(grid) for grid in params["grids"]]
        return f"{head}, grids: " + ", ".join(
            f"{grid} ({tokens:,} tokens)" for grid, tokens in zip(params["grids"], sizes, strict=True)
        )
    line = (
        f"{head}, preset {params['preset']}, {params['grid']} tokens ({params['tokens']:,}), "
        f"clip {params['clip']}, batch {params['batch']}"
    )
    applied = [f"ac {params['ac']}"] if params.get("ac", "off") != "off" else []
    applied += ["compiled blocks"] if params.get("compile") else []
    line += "".join(f", {what}" for what in applied)
    return line + (f", decode: {params['autoencoder']}" if benchmark == SAMPLE_LADDER else "")


def _tokens(grid: str) -> int:
    t, h, w = (int(n) for n in grid.split("x"))
    return t * h * w


def results_view(document: dict[str, Any]) -> tuple[Table, list[str]]:
    """(the table, the notes) of a results document, as `eflow bench` prints them after a run."""
    benchmark = document.get("benchmark", ATTENTION)
    env, params, records = document["environment"], document["parameters"], document["results"]
    notes = list(dict.fromkeys(r["note"] for r in records if r.get("note")))
    if benchmark == ATTENTION:
        title = f"attention ({params['scope']}) on {env['device_name']}, {records[0]['dtype']}"
        if any(r["check_against"] == "cpu fp64 attend" for r in records):
            notes.append(CHECK_NOTE)
        return attention_table(records, title), notes
    title = (
        f"{LADDER_TITLES[benchmark]} on {env['device_name']}: {params['preset']}, {params['grid']} tokens, "
        f"batch {params['batch']}, {records[0]['dtype']}"
    )
    if benchmark == TRAIN_LADDER:
        return train_table(records, title), [*notes, PASSES_NOTE]
    if params["autoencoder"] == "pixel":
        notes.append(PIXEL_NOTE)
    return sample_table(records, title), notes
