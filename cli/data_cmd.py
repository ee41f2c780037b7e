"""`eflow data preview`: write a few clips of a dataset to mp4/gif/PNG to look at them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices, parse_size

data_app = typer.Typer(help="Look at datasets.", no_args_is_help=True)


@data_app.command("preview")
def preview(
    data: Annotated[str, typer.Option(help=f"dataset: {choices('dataset')}")] = "shapes",
    num: Annotated[int, typer.Option(help="number of clips")] = 8,
    frames: Annotated[int, typer.Option(help="frames per clip")] = 16,
    size: Annotated[str, typer.Option(help="N or HxW pixels")] = "64",
    seed: Annotated[int, typer.Option(help="dataset seed")] = 0,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/preview"),
) -> None:
    """Write the first NUM clips of a dataset as a mosaic mp4, a gif and a PNG frame grid."""
    import torch

    from eflow.errors import EflowError
    from eflow.registry import get_registry
    from eflow.sampling import write_samples

    with user_errors():
        h, w = parse_size(size)
        dataset = get_registry("dataset").create(data, frames, h, w, seed=seed)
        items = [dataset[i] for i in range(num)]
        videos = torch.stack([it["video"] for it in items])
        try:
            paths = write_samples(videos, out, fps=8, stem=data)
        except OSError as err:
            raise EflowError(f"cannot write to --out {out}: {err.strerror or err}") from None
        for i, it in enumerate(items):
            err_console.print(f"  clip {i}: label {it.get('label', '-')}  {it.get('caption', '')}")
        for kind, path in paths.items():
            typer.echo(f"  {kind}: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
