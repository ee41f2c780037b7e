"""`eflow train`: resolve the RunConfig (eflow.run_config), then train it (eflow.train.trainer)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices
from eflow.run_config import SCHEDULE_FLAGS, SIZE_FLAG, TRAIN_FLAGS, resolve_run_config

MODEL, DATA, OPT, SCHED, RUN = "Model", "Data", "Objective & optimization", "Token drop and schedule", "Run"
PAR = "Memory and parallelism (docs/scaling.md)"
CONFIG_FLAGS = {*TRAIN_FLAGS, SIZE_FLAG, *SCHEDULE_FLAGS}  # the options that are config layers


def register(app: typer.Typer) -> None:
    @app.command(no_args_is_help=False)
    def train(
        preset: Annotated[
            str | None, typer.Option(help="model preset: tiny, B, XL, XXL, 1.5B", rich_help_panel=MODEL)
        ] = None,
        attn: Annotated[
            str | None, typer.Option(help=f"attention backend: {choices('attention')}", rich_help_panel=MODEL)
        ] = None,
        objective: Annotated[
            str | None, typer.Option(help=f"objective: {choices('objective')}", rich_help_panel=OPT)
        ] = None,
        mva: Annotated[
            bool | None,
            typer.Option("--mva/--no-mva", help="Mean-Velocity Additivity (SFM family)", rich_help_panel=OPT),
        ] = None,
        token_drop: Annotated[
            str | None,
            typer.Option(help=f"token-drop strategy: {choices('token_drop')}", rich_help_panel=SCHED),
        ] = None,
        drop_ratio: Annotated[
            float | None,
            typer.Option(
                help="drop ratio of the first stage of schedule.stages (EFlow: 0.75)", rich_help_panel=SCHED
            ),
        ] = None,
        drop_until: Annotated[
            float | None,
            typer.Option(help="fraction of steps trained with dropping (EFlow: 0.8)", rich_help_panel=SCHED),
        ] = None,
        dense_every: Annotated[
            int | None,
            typer.Option(help="one dense step every n while dropping (T2V: 10)", rich_help_panel=SCHED),
        ] = None,
        data: Annotated[
            str | None, typer.Option(help=f"dataset: {choices('dataset')}", rich_help_panel=DATA)
        ] = None,
        data_root: Annotated[
            str | None,
            typer.Option(
                help="the dataset's folder or manifest (video-folder, captions, latents)",
                rich_help_panel=DATA,
            ),
        ] = None,
        reader: Annotated[
            str | None,
            typer.Option(
                help="video decoder: auto (decord if installed), pyav, decord", rich_help_panel=DATA
            ),
        ] = None,
        image_ratio: Annotated[
            float | None,
            typer.Option(
                help="share of steps trained on the dataset's images (T2V: 0.1)", rich_help_panel=DATA
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(help="DataLoader worker processes (default: auto)", rich_help_panel=DATA),
        ] = None,
        autoencoder: Annotated[
            str | None,
            typer.Option(help=f"autoencoder: {choices('autoencoder')}", rich_help_panel=DATA),
        ] = None,
        vae_path: Annotated[
            str | None,
            typer.Option(
                help="local folder of the autoencoder's weights (wan: a Wan 2.1 repo or its vae/)",
                rich_help_panel=DATA,
            ),
        ] = None,
        text_encoder: Annotated[
            str | None,
            typer.Option(
                help=f"text encoder for --condition text: {choices('text_encoder')}", rich_help_panel=DATA
            ),
        ] = None,
        frames: Annotated[int | None, typer.Option(help="frames per clip", rich_help_panel=DATA)] = None,
        size: Annotated[
            str | None, typer.Option(help="clip size in pixels: N or HxW", rich_help_panel=DATA)
        ] = None,
        condition: Annotated[str | None, typer.Option(help="label or text", rich_help_panel=DATA)] = None,
        batch_size: Annotated[int | None, typer.Option(help="global batch size", rich_help_panel=OPT)] = None,
        steps: Annotated[int | None, typer.Option(help="optimizer steps", rich_help_panel=OPT)] = None,
        lr: Annotated[float | None, typer.Option(help="AdamW learning rate", rich_help_panel=OPT)] = None,
        seed: Annotated[int | None, typer.Option(help="seed of the run", rich_help_panel=RUN)] = None,
        device: Annotated[
            str | None, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=RUN)
        ] = None,
        precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16", rich_help_panel=RUN)] = None,
        threads: Annotated[
            int | None, typer.Option(help="CPU threads (0 = torch default)", rich_help_panel=RUN)
        ] = None,
        eval_every: Annotated[
            int | None,
            typer.Option(
                help="validate every n steps: FVD / class accuracy of EMA samples", rich_help_panel=RUN
            ),
        ] = None,
        eval_num: Annotated[
            int | None, typer.Option(help="clips per validation (default 256)", rich_help_panel=RUN)
        ] = None,
        ac: Annotated[
            str | None,
            typer.Option(help="activation checkpointing: off, full, selective", rich_help_panel=PAR),
        ] = None,
        compile_: Annotated[
            bool | None,
            typer.Option("--compile/--no-compile", help="torch.compile every block", rich_help_panel=PAR),
        ] = None,
        fsdp: Annotated[
            bool | None,
            typer.Option("--fsdp/--no-fsdp", help="FSDP2 sharding under torchrun", rich_help_panel=PAR),
        ] = None,
        sp: Annotated[
            int | None,
            typer.Option(
                help="Ulysses sequence parallelism under torchrun: ranks per group sharing a batch's tokens",
                rich_help_panel=PAR,
            ),
        ] = None,
        out: Annotated[str | None, typer.Option(help="run directory", rich_help_panel=RUN)] = None,
        save_every: Annotated[
            int | None, typer.Option(help="checkpoint every n steps", rich_help_panel=RUN)
        ] = None,
        keep: Annotated[
            int | None, typer.Option(help="checkpoints kept (the newest; default 2)", rich_help_panel=RUN)
        ] = None,
        preview_every: Annotated[
            int | None, typer.Option(help="sample preview every n steps", rich_help_panel=RUN)
        ] = None,
        track: Annotated[
            list[str] | None,
            typer.Option(
                help="mirror metrics and previews to tensorboard and/or wandb (repeat, or a,b)",
                rich_help_panel=RUN,
            ),
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="continue the run in --out", rich_help_panel=RUN)
        ] = False,
        overwrite: Annotated[
            bool,
            typer.Option(
                "--overwrite", help="start over in --out, deleting the run there", rich_help_panel=RUN
            ),
        ] = False,
        config: Annotated[
            Path | None,
            typer.Option(
                help="run.toml with any RunConfig fields (or a run's config.json)", rich_help_panel=RUN
            ),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="override any field: --set train.ema_decay=0.99", rich_help_panel=RUN),
        ] = None,
        print_config: Annotated[
            bool,
            typer.Option("--print-config", help="print the resolved config and exit", rich_help_panel=RUN),
        ] = False,
    ) -> None:
        """Train a video DiT (default: the EFlow recipe: GLGA, PDG-SFM + MVA, SPRINT 75% drop for 80% of steps).

        The run's stages are one schedule section: schedule.stages tables tiling [0, 1] of the steps,
        each with drop_ratio, dense_every, mva_share and optionally frames, height, width (a clip-size
        curriculum). --drop-ratio, --drop-until and --dense-every write a one- or two-stage schedule;
        write other schedules in a run.toml (docs/configuration.md). Old configs with
        token_drop.stages / data.stages load, converted to schedule.stages with a note.
        """
        given = locals()
        flags = {name: given[name] for name in CONFIG_FLAGS}
        # --track tensorboard,wandb = --track tensorboard --track wandb; not given: None, not []
        flags["track"] = (
            [n.strip() for names in track for n in names.split(",") if n.strip()] if track else None
        )
        from eflow.train.trainer import Trainer

        with user_errors():
            notes: list[str] = []
            cfg = resolve_run_config(config, flags, set_, resume=resume, notes=notes)
            for note in notes:
                err_console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
            if print_config:
                typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
                return
            result = Trainer(cfg, resume=resume, overwrite=overwrite, console=err_console).run()
            err_console.print(
                f"[green]done:[/] {result.step} steps, last loss {result.last_loss:.4f}; run saved in {result.run_dir}"
            )

    show_defaults(train)


def show_defaults(command) -> None:
    """Append RunConfig's default to the help of every option that sets one of its fields (the options
    default to None so that config files can layer under them, which hides the real default)."""
    from eflow.config import RunConfig

    defaults = RunConfig().model_dump(mode="json")
    hints = typing.get_type_hints(command, include_extras=True)  # evaluated once, kept below
    for name, hint in hints.items():
        path = TRAIN_FLAGS.get(name)
        value: object = defaults
        for key in (path or "").split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if path is None or value in (None, [], {}):
            continue
        for info in getattr(hint, "__metadata__", ()):
            if isinstance(info, typer.models.OptionInfo) and info.help and "default" not in info.help:
                shown = ",".join(map(str, value)) if isinstance(value, list) else value
                info.help = f"{info.help} (default: {shown})"
    command.__annotations__ = hints  # typer would evaluate the string annotations afresh
