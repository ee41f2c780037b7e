"""Turn user errors into one clear message and a non-zero exit, never a traceback wall."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from eflow.errors import EflowError

err_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print EflowError (bad name, config, path) as `error: ...` and exit with status 2."""
    try:
        yield
    except EflowError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
        raise typer.Exit(code=2) from None
