"""Benchmark results on disk: results.json (environment, parameters, records) and results.csv (records).

results.json = {"benchmark": "attention", "environment": {device name, torch, CUDA, cuDNN, Python,
eflow version, date (UTC), command line, ...}, "parameters": {the sweep spec}, "results": [one object
per cell]}. results.csv holds the same records, one row per cell, options as a JSON string. Both are
rewritten after every cell (`collect_results`), so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from eflow.errors import EflowError

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def environment(device: torch.device, dtype: torch.dtype, command: str) -> dict[str, Any]:
    """Where and how the benchmark ran."""
    from eflow import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "eflow": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def spec_environment(spec: Any, command: str) -> dict[str, Any]:
    """The environment of a spec's run: its device (spec.device resolved) and dtype (spec.torch_dtype)."""
    from eflow.assembly import resolve_device

    device = resolve_device(spec.device)
    return environment(device, spec.torch_dtype(device), command)


def collect_results(
    out: Path,
    benchmark: str,
    env: dict[str, Any],
    parameters: dict[str, Any],
    records: Iterable[Any],
    on_record: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Take the records (dataclasses) as they come, rewriting results.json and results.csv in `out` after
    each (then on_record()); the results document of them all."""
    rows: list[dict[str, Any]] = []
    for record in records:
        rows.append(asdict(record))
        write_results(out, benchmark, env, parameters, rows)
        if on_record is not None:
            on_record()
    return {"benchmark": benchmark, "environment": env, "parameters": parameters, "results": rows}


def write_results(
    out: Path, benchmark: str, env: dict[str, Any], parameters: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Path]:
    """Write results.json and results.csv into `out` (created); returns their paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = out / RESULTS_JSON, out / RESULTS_CSV
        document = {"benchmark": benchmark, "environment": env, "parameters": parameters, "results": records}
        _replace(json_path, json.dumps(document, indent=2) + "\n")
        if records:
            tmp = csv_path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(records[0]))
                writer.writeheader()
                for record in records:
                    writer.writerow(
                        {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in record.items()}
                    )
            os.replace(tmp, csv_path)
    except OSError as err:
        raise EflowError(f"cannot write results to --out {out}: {err.strerror or err}") from None
    return {"json": json_path, "csv": csv_path}


def read_results(path: Path) -> dict[str, Any]:
    """results.json of a directory (or the file itself), checked to hold results."""
    file = path / RESULTS_JSON if path.is_dir() else path
    if not file.is_file():
        raise EflowError(f"no {RESULTS_JSON} in {path}; write one with `eflow bench attention --out {path}`")
    try:
        document = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EflowError(f"{file}: not a readable results file: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise EflowError(f"{file}: no 'results' list; is it a file written by `eflow bench`?")
    return document


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
