"""`eflow data preview`: write a few clips of a dataset to look at them; `eflow data encode`: latent shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import apply_overrides, choices, config_layer, parse_size

data_app = typer.Typer(help="Look at datasets and encode them to latents.", no_args_is_help=True)
SOURCE, ENCODERS, OUTPUT = "Source", "Encoders", "Output"


@data_app.command("preview")
def preview(
    data: Annotated[str, typer.Option(help=f"dataset: {choices('dataset')}")] = "shapes",
    data_root: Annotated[
        str | None, typer.Option(help="the dataset's folder or manifest (video-folder, captions)")
    ] = None,
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
        options = {"root": data_root} if data_root is not None else None
        dataset = get_registry("dataset").create(data, frames, h, w, seed=seed, options=options)
        items = [dataset[i] for i in range(min(num, len(dataset)))]
        if items and "video" not in items[0]:
            raise EflowError(f"dataset '{data}' yields pre-encoded latents, not pixels: nothing to preview")
        items = [it for it in items if it["video"].shape == items[0]["video"].shape]  # clips, or images
        videos = torch.stack([it["video"] for it in items])
        try:
            paths = write_samples(videos, out, fps=8, stem=data)
        except OSError as err:
            raise EflowError(f"cannot write to --out {out}: {err.strerror or err}") from None
        for i, it in enumerate(items):
            err_console.print(f"  clip {i}: label {it.get('label', '-')}  {it.get('caption', '')}")
        for kind, path in paths.items():
            typer.echo(f"  {kind}: {path}")


def encode_layer(**flags) -> dict:
    """The RunConfig layer given by the explicit flags of `eflow data encode` (None = not given)."""
    return config_layer(
        flags,
        {
            "data": "data.name",
            "data_root": "data.options.root",
            "frames": "data.frames",
            "autoencoder": "data.autoencoder",
            "vae_path": "data.autoencoder_options.path",
            "text_encoder": "data.text_encoder",
            "seed": "train.seed",
        },
    )


def resolved_options(kind: str, name: str, options: dict) -> dict:
    """A plugin's options with every default filled in, as JSON (recorded in index.json)."""
    from eflow.registry import get_registry

    parsed = get_registry(kind).get(name).parse_options(options)
    return parsed.model_dump(mode="json") if parsed is not None else {}


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
        str, typer.Option(help="stored dtype: float32, bfloat16, float16", rich_help_panel=OUTPUT)
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
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from eflow.assembly import build_dataset, resolve_device
    from eflow.config import build_config, load_toml
    from eflow.data.latent_shards import INDEX, ShardEncoder, check_storage_dtype
    from eflow.errors import EflowError
    from eflow.registry import get_registry

    with user_errors():
        check_storage_dtype(dtype)
        tree: dict = {}
        apply_overrides(tree, set_ or [])
        layers = [load_toml(config)] if config is not None else []
        flags = dict(data=data, data_root=data_root, frames=frames, size=size, autoencoder=autoencoder)
        flags.update(vae_path=vae_path, text_encoder=text_encoder, seed=seed)
        cfg = build_config(*layers, encode_layer(**flags), tree)
        d = cfg.data
        with_text = text_encoder is not None or d.condition == "text"
        data_options = resolved_options("dataset", d.name, d.options)
        ae_options = resolved_options("autoencoder", d.autoencoder, d.autoencoder_options)
        te_options = (
            resolved_options("text_encoder", d.text_encoder, d.text_encoder_options) if with_text else None
        )
        dev = resolve_device(device)
        dataset = build_dataset(cfg)
        ae = get_registry("autoencoder").create(d.autoencoder, options=ae_options)
        latent_shape = list(ae.latent_shape((3, d.frames, d.height, d.width)))
        has_images = bool(getattr(dataset, "image_indices", None))
        image_latent_shape = list(ae.latent_shape((3, 1, d.height, d.width))) if has_images else None
        normalization = ae.normalization() if callable(getattr(ae, "normalization", None)) else None
        te = get_registry("text_encoder").create(d.text_encoder, options=te_options) if with_text else None
        for part in (ae, te):
            if hasattr(part, "to"):
                part.to(dev)
        recipe = {
            "dataset": {
                "name": d.name,
                "options": data_options,
                "seed": cfg.train.seed,
                "length": len(dataset),
                "limit": limit,
            },
            "clip": {"frames": d.frames, "height": d.height, "width": d.width},
            "autoencoder": {
                "name": d.autoencoder,
                "options": ae_options,
                "latent_shape": latent_shape,
                "image_latent_shape": image_latent_shape,
                "normalization": normalization,
            },
            "text_encoder": {"name": d.text_encoder, "options": te_options, "dim": int(te.dim)}
            if te
            else None,
            "shard_size": shard_size,
            "dtype": dtype,
        }
        if workers is None:
            from eflow.data.loader import auto_workers

            workers = auto_workers([dataset])
        encoder = ShardEncoder(
            dataset, ae, out, recipe, text_encoder=te, batch_size=batch_size, device=dev, workers=workers
        )
        if encoder.index["complete"]:
            done = encoder.index["counts"]["encoded"]
            typer.echo(f"{out} is already complete ({done} items); nothing to do")
            typer.echo(f"train on them: {train_hint(out, cfg, with_text)}")
            return
        if encoder.shards_done:
            err_console.print(f"resuming {out}: {encoder.shards_done} of {encoder.num_shards} shards done")

        def warn(record: dict) -> None:
            where = escape(record["file"] or f"item {record['index']}")
            err_console.print(
                f"[yellow]warning:[/] skipped {where}: {escape(record['reason'])}", highlight=False
            )

        progress = Progress(
            TextColumn("[bold]encode[/]"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=err_console,
        )
        with progress:
            task = progress.add_task("encode", total=encoder.length, completed=encoder.items_done, info="")

            def advance() -> None:
                progress.update(task, advance=1, info=f"shard {encoder.shards_done + 1}/{encoder.num_shards}")

            try:
                index = encoder.run(max_shards=max_shards, on_item=advance, on_skip=warn)
            except KeyboardInterrupt:
                raise EflowError(
                    f"interrupted: {encoder.shards_done} of {encoder.num_shards} shards are complete in {out}; "
                    "run the same command again to continue"
                ) from None
        counts = index["counts"]
        state = "done" if index["complete"] else "stopped early (run the same command again to continue)"
        typer.echo(
            f"{state}: {counts['encoded']} items encoded, {counts['skipped']} skipped, "
            f"{len(index['shards'])} of {encoder.num_shards} shards in {out} (see {out / INDEX})"
        )
        if index["complete"]:
            typer.echo(f"train on them: {train_hint(out, cfg, with_text)}")


def train_hint(out: Path, cfg, with_text: bool) -> str:
    """The `eflow train` command line that trains on an encoded folder with the same encoders."""
    d = cfg.data
    words = ["eflow train --data latents --data-root", str(out), f"--frames {d.frames}"]
    words.append(f"--size {d.height}x{d.width}")
    if d.autoencoder != "pixel":
        words.append(f"--set data.autoencoder={d.autoencoder}")
        words += [f"--set data.autoencoder_options.{k}={v}" for k, v in d.autoencoder_options.items()]
    if with_text:
        words.append(f"--condition text --set data.text_encoder={d.text_encoder}")
        words += [f"--set data.text_encoder_options.{k}={v}" for k, v in d.text_encoder_options.items()]
    return " ".join(words)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
