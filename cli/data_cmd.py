"""`eflow data preview`: write a few clips of a dataset to look at them; `eflow data encode`: latent shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices
from eflow.run_config import parse_size

data_app = typer.Typer(help="Look at datasets and encode them to latents.", no_args_is_help=True)
SOURCE, ENCODERS, OUTPUT = "Source", "Encoders", "Output"


@data_app.command("preview")
def preview(
    data: Annotated[str, typer.Option(help=f"dataset: {choices('dataset')}")] = "shapes",
    data_root: Annotated[
        str | None, typer.Option(help="the dataset's folder or manifest (video-folder, captions)")
    ] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="number of clips", min=1)] = 8,
    frames: Annotated[int, typer.Option(help="frames per clip", min=1)] = 16,
    size: Annotated[str, typer.Option(help="N or HxW pixels")] = "64",
    seed: Annotated[int, typer.Option(help="dataset seed", min=0)] = 0,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/preview"),
) -> None:
    """Write the first NUM clips of a dataset as a mosaic mp4, a gif and a PNG frame grid."""
    from eflow.data.preview import preview_items, write_preview

    with user_errors():
        h, w = parse_size(size)
        options = {"root": data_root} if data_root is not None else None
        items = preview_items(data, frames, h, w, num=num, seed=seed, options=options)
        paths = write_preview(items, out, stem=data)
        for i, it in enumerate(items):
            err_console.print(f"  clip {i}: label {it.get('label', '-')}  {it.get('caption', '')}")
        for kind, path in paths.items():
            typer.echo(f"  {kind}: {path}")


@data_app.command("encode")
def encode(
    out: Annotated[Path, typer.Option(help="folder for the shards and index.json", rich_help_panel=OUTPUT)],
    data: Annotated[
        str | None, typer.Option(help=f"dataset: {choices('dataset')}", rich_help_panel=SOURCE)
    ] = None,
    data_root: Annotated[
        str | None,
        typer.Option(help="the dataset's folder or manifest (data.options.root)", rich_help_panel=SOURCE),
    ] = None,
    frames: Annotated[int | None, typer.Option(help="frames per clip", rich_help_panel=SOURCE)] = None,
    size: Annotated[
        str | None, typer.Option(help="clip size in pixels: N or HxW", rich_help_panel=SOURCE)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="dataset seed (train.seed)", rich_help_panel=SOURCE)
    ] = None,
    autoencoder: Annotated[
        str | None, typer.Option(help=f"autoencoder: {choices('autoencoder')}", rich_help_panel=ENCODERS)
    ] = None,
    vae_path: Annotated[
        str | None, typer.Option(help="local folder of the VAE weights (wan)", rich_help_panel=ENCODERS)
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help=f"also encode captions with: {choices('text_encoder')}", rich_help_panel=ENCODERS),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="clips per autoencoder call", rich_help_panel=ENCODERS)
    ] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=ENCODERS)] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, help="processes reading items (default: 0 for computed datasets)", rich_help_panel=SOURCE
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option(min=1, help="dataset items per shard", rich_help_panel=OUTPUT)
    ] = 256,
    dtype: Annotated[
        str,
        typer.Option(
            help="stored dtype: float32, bfloat16, float16 (or fp32, bf16, fp16)", rich_help_panel=OUTPUT
        ),
    ] = "float32",
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="encode only the first N items of the dataset", rich_help_panel=SOURCE),
    ] = None,
    max_shards: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="write at most this many new shards, then stop (rerun to go on)",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="run.toml: its data section (and train.seed) is what gets encoded", rich_help_panel=SOURCE
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="any RunConfig field: --set data.autoencoder_options.tiling=true",
            rich_help_panel=SOURCE,
        ),
    ] = None,
) -> None:
    """Encode a dataset once into latent shards (resumable); train on them with --data latents --data-root OUT.

    Captions are encoded too when --text-encoder is given or the config's data.condition is "text".
    """
    from eflow.data.encode import encode_config, prepare_encode
    from eflow.data.latent_shards import storage_dtype_name

    with user_errors():
        dtype = storage_dtype_name(dtype)
        flags = dict(data=data, data_root=data_root, frames=frames, size=size, autoencoder=autoencoder)
        flags.update(vae_path=vae_path, text_encoder=text_encoder, seed=seed)
        cfg = encode_config(config, flags, set_)
        job = prepare_encode(
            cfg,
            out,
            with_text=text_encoder is not None,
            batch_size=batch_size,
            device=device,
            workers=workers,
            shard_size=shard_size,
            dtype=dtype,
            limit=limit,
        )
        try:
            _run_encode(job, max_shards)
        finally:
            job.close()


def _run_encode(job, max_shards: int | None) -> None:
    """Run a prepared encode with a progress bar (rank 0's share under torchrun) and a summary."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from eflow.data.latent_shards import INDEX
    from eflow.errors import EflowError

    encoder, world, out = job.encoder, job.world, job.out
    say = typer.echo if world.is_main else (lambda text: None)  # one summary, from rank 0
    if encoder.index["complete"]:
        say(f"{out} is already complete ({encoder.index['counts']['encoded']} items); nothing to do")
        say(f"train on them: {job.train_command()}")
        return
    if encoder.shards_done and world.is_main:
        err_console.print(f"resuming {out}: {encoder.shards_done} of {encoder.num_shards} shards done")
    mine = encoder.share(max_shards)
    if world.size > 1 and world.is_main:
        todo = len(encoder.todo(max_shards))
        err_console.print(
            f"encoding {todo} of {encoder.num_shards} shards on {world.size} processes "
            f"(the bar shows rank 0's {len(mine)})"
        )
    who = f"rank {world.rank}: " if world.size > 1 else ""

    def warn(record: dict) -> None:
        where = escape(record["file"] or f"item {record['index']}")
        err_console.print(
            f"[yellow]{who}warning:[/] skipped {where}: {escape(record['reason'])}", highlight=False
        )

    progress = Progress(
        TextColumn("[bold]encode[/]"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not world.is_main,
    )
    first, items_before = encoder.shards_done, encoder.items_done
    if world.size == 1:  # the whole dataset, what earlier runs did included
        total, done, offset, shards = encoder.length, encoder.items_done, 0, encoder.num_shards
    else:  # rank 0's share
        total, done, offset, shards = encoder.items_in(mine), 0, first, len(mine)
    with progress:
        task = progress.add_task("encode", total=total, completed=done, info="")

        items_done: list[float] = []  # when each of rank 0's first batch of items was done (warm-up)

        def advance() -> None:
            if len(items_done) < encoder.batch_size:  # the last: after the autoencoder's first call
                items_done.append(time.perf_counter())
            progress.update(task, advance=1, info=f"shard {encoder.shards_done - offset + 1}/{shards}")

        started = time.perf_counter()
        try:
            index = encoder.run(
                max_shards=max_shards, on_item=advance if world.is_main else None, on_skip=warn
            )
        except KeyboardInterrupt:
            if world.size > 1:
                raise EflowError(
                    f"interrupted: rank {world.rank} wrote {encoder.shards_done - first} of its {len(mine)} "
                    f"shards in {out}; run the same command again (with any number of processes) to continue"
                ) from None
            raise EflowError(
                f"interrupted: {encoder.shards_done} of {encoder.num_shards} shards are complete in {out}; "
                "run the same command again to continue"
            ) from None
    seconds = time.perf_counter() - started  # rank 0: until every rank is done and the index merged
    counts = index["counts"]
    state = "done" if index["complete"] else "stopped early (run the same command again to continue)"
    new = counts["encoded"] - items_before
    say(
        f"{state}: {counts['encoded']} items encoded, {counts['skipped']} skipped, "
        f"{len(index['shards'])} of {encoder.num_shards} shards in {out} (see {out / INDEX}); "
        f"this call encoded {new} in {seconds:.1f} s ({new / max(seconds, 1e-9):.2f} items/s, start-up not counted)"
        + (f"; the first batch after {items_done[-1] - started:.1f} s" if items_done else "")
    )
    if index["complete"]:
        say(f"train on them: {job.train_command()}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
