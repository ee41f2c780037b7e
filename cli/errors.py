"""Turn user errors into one clear message and a non-zero exit, never a traceback wall."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from eflow.errors import EflowError

err_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print EflowError (bad name, config, path) as `error: ...` and exit with status 2; Ctrl-C is one
    `interrupted` line and status 130 (the shell's convention), not a traceback."""
    try:
        yield
    except EflowError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, markup=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/] (Ctrl-C)", highlight=False)
        raise typer.Exit(code=130) from None
