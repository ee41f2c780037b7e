"""The `eflow` command: train, sample, plugins, model info, data, bench, eval, export, plus plugin commands."""

from __future__ import annotations

import sys

import typer

from eflow.cli import (
    bench_cmd,
    data_cmd,
    distill_cmd,
    eval_cmd,
    export_cmd,
    model_cmd,
    plot_cmd,
    plugins_cmd,
    repro_cmd,
    sample,
    train,
)

app = typer.Typer(
    name="eflow",
    help="Train, sample and benchmark efficient few-step video diffusion transformers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

for module in (
    train,
    sample,
    plugins_cmd,
    model_cmd,
    data_cmd,
    bench_cmd,
    eval_cmd,
    distill_cmd,
    repro_cmd,
    plot_cmd,
    export_cmd,
):
    module.register(app)


def _plugin_commands() -> None:
    from eflow.registry import host

    host().call_register_commands(app)


_plugin_commands()


def _print_version(value: bool) -> None:
    if value:
        from eflow import __version__

        typer.echo(f"eflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="print the version and exit", is_eager=True, callback=_print_version
    ),
) -> None:
    """Train, sample and benchmark efficient few-step video diffusion transformers."""


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
