"""`eflow model info`: parameter counts of a preset (built on the meta device, no memory used)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from eflow.cli.errors import user_errors
from eflow.cli.options import choices

model_app = typer.Typer(help="Inspect model presets.", no_args_is_help=True)


@model_app.command("info")
def info(
    preset: Annotated[str, typer.Option(help="tiny, B, XL, XXL, 1.5B")] = "XL",
    attn: Annotated[str, typer.Option(help=f"attention backend: {choices('attention')}")] = "glga",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Parameter counts, total and per part, of a preset with an attention backend."""
    from eflow.model.preset_counts import preset_parameter_counts

    with user_errors():
        counts = preset_parameter_counts(preset, attn)
        if as_json:
            typer.echo(json.dumps({"preset": preset, "attention": attn, "parameters": counts}, indent=2))
            return
        table = Table(title=f"{preset} with {attn} attention")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        table.add_column("millions", justify="right")
        for part, n in counts.items():
            table.add_row(part, f"{n:,}", f"{n / 1e6:.1f}M")
        Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
