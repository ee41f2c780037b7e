"""`eflow plugins`: every registered implementation with its owning plugin, and plugins that failed."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from eflow.cli.errors import user_errors


def rows() -> list[dict[str, str]]:
    """One row per registered implementation, plus a 'failed' row per plugin that did not load."""
    from eflow.registry import KINDS, get_registry, plugin_infos

    out = []
    for kind in KINDS:
        for entry in get_registry(kind).entries():
            out.append(
                {
                    "kind": kind,
                    "name": entry.name,
                    "summary": entry.summary,
                    "plugin": entry.owner,
                    "version": entry.version,
                    "status": "ok",
                }
            )
    for info in plugin_infos():
        for skipped in info.skipped:
            out.append(
                {
                    "kind": skipped.split(" ", 1)[0],
                    "name": "-",
                    "summary": f"skipped duplicate: {skipped}",
                    "plugin": info.name,
                    "version": info.version,
                    "status": "skipped",
                }
            )
        if info.status == "failed":
            out.append(
                {
                    "kind": "-",
                    "name": "-",
                    "summary": info.error,
                    "plugin": info.name,
                    "version": info.version,
                    "status": "failed",
                }
            )
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def plugins(
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """List registered plugins: kind, name, summary, owning plugin and version."""
        with user_errors():
            table_rows = rows()
        if as_json:
            typer.echo(json.dumps(table_rows, indent=2))
            return
        table = Table(title="eflow plugins")
        for col in ("kind", "name", "summary", "plugin", "version", "status"):
            table.add_column(col, overflow="fold")
        for r in table_rows:
            style = {"failed": "red", "skipped": "yellow"}.get(r["status"])
            table.add_row(
                *(r[c] for c in ("kind", "name", "summary", "plugin", "version", "status")), style=style
            )
        Console().print(table)
