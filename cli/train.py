"""`eflow train`: build a RunConfig from defaults, run.toml and flags, then train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import apply_overrides, choices, config_layer
from eflow.config import RunConfig, build_config, load_run_config, load_toml
from eflow.errors import ConfigError

MODEL, DATA, OPT, SCHED, RUN = "Model", "Data", "Objective & optimization", "Token drop schedule", "Run"


def flags_layer(**flags: Any) -> dict[str, Any]:
    """The config layer given by explicit flags (None = not given)."""
    paths = {
        "preset": "model.preset",
        "attn": "model.attention",
        "objective": "objective.name",
        "token_drop": "token_drop.name",
        "data": "data.name",
        "data_root": "data.options.root",
        "reader": "data.options.reader",
        "image_ratio": "data.image_ratio",
        "autoencoder": "data.autoencoder",
        "vae_path": "data.autoencoder_options.path",
        "text_encoder": "data.text_encoder",
        "workers": "train.workers",
        "frames": "data.frames",
        "condition": "data.condition",
        "batch_size": "train.batch_size",
        "steps": "train.steps",
        "lr": "train.lr",
        "seed": "train.seed",
        "device": "train.device",
        "out": "train.out",
        "save_every": "train.save_every",
        "keep": "train.keep_checkpoints",
        "preview_every": "train.preview_every",
        "threads": "train.threads",
        "precision": "train.precision",
        "mva": "objective.options.mva",
    }
    return config_layer(flags, paths)


def schedule_layer(
    base: RunConfig, ratio: float | None, until: float | None, dense_every: int | None
) -> dict:
    """Stages from the simple flags: drop `ratio` for the first `until` of the steps, then dense."""
    if ratio is None and until is None and dense_every is None:
        return {}
    stages = base.token_drop.stages
    ratio = stages[0].drop_ratio if ratio is None else ratio
    until = (stages[0].end if len(stages) > 1 else 1.0) if until is None else until
    dense_every = stages[0].dense_every if dense_every is None else dense_every
    mva_last = stages[-1].mva_share
    if not 0 < until <= 1:
        raise ConfigError(f"--drop-until {until}: give a fraction of the steps in (0, 1]")
    if until >= 1.0:  # one stage: drop (or not) for the whole run; MVA, if on, for the whole run too
        first = {
            "start": 0.0,
            "end": 1.0,
            "drop_ratio": ratio,
            "dense_every": dense_every,
            "mva_share": mva_last,
        }
        return {"token_drop": {"stages": [first]}}
    first = {"start": 0.0, "end": until, "drop_ratio": ratio, "dense_every": dense_every, "mva_share": 0.0}
    last = {"start": until, "end": 1.0, "drop_ratio": 0.0, "dense_every": 0, "mva_share": mva_last}
    return {"token_drop": {"stages": [first, last]}}


def resolve(
    config: Path | None, resume: bool, out: str | None, flags: dict, overrides: list[str], sched: dict
) -> RunConfig:
    """defaults -> (saved config when resuming) -> run.toml -> flags -> --set, validated."""
    layers: list[dict] = []
    if resume:
        from_file = load_toml(config).get("train", {}).get("out") if config else None
        run_dir = out or from_file or RunConfig().train.out
        layers.append(load_run_config(run_dir).model_dump(mode="json"))
    if config is not None:
        layers.append(load_toml(config))
    layers.append(flags_layer(**flags))
    base = build_config(*layers)
    layers.append(schedule_layer(base, **sched))
    tree: dict = {}
    apply_overrides(tree, overrides)
    layers.append(tree)
    return build_config(*layers)


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
            typer.Option(help="drop ratio of the first stage (EFlow: 0.75)", rich_help_panel=SCHED),
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
            Path | None, typer.Option(help="run.toml with any RunConfig fields", rich_help_panel=RUN)
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
        """Train a video DiT (default: the EFlow recipe: GLGA, PDG-SFM + MVA, SPRINT 75% drop for 80% of steps)."""
        from eflow.assembly import resolve_plugin_options, validate_plugins
        from eflow.train.trainer import Trainer

        with user_errors():
            flags = dict(
                preset=preset,
                attn=attn,
                objective=objective,
                mva=mva,
                token_drop=token_drop,
                data=data,
                data_root=data_root,
                reader=reader,
                image_ratio=image_ratio,
                autoencoder=autoencoder,
                vae_path=vae_path,
                text_encoder=text_encoder,
                workers=workers,
                frames=frames,
                size=size,
                condition=condition,
                batch_size=batch_size,
                steps=steps,
                lr=lr,
                seed=seed,
                device=device,
                precision=precision,
                threads=threads,
                out=out,
                save_every=save_every,
                keep=keep,
                preview_every=preview_every,
            )
            sched = {"ratio": drop_ratio, "until": drop_until, "dense_every": dense_every}
            cfg = resolve(config, resume, out, flags, set_ or [], sched)
            if cfg.objective.options.get("mva") and cfg.objective.name == "fm":
                raise ConfigError(
                    "objective.options.mva (--mva) needs an objective of the SFM family (sfm, pdg-sfm), not fm"
                )
            validate_plugins(cfg)
            resolve_plugin_options(cfg)
            if print_config:
                typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
                return
            result = Trainer(cfg, resume=resume, overwrite=overwrite, console=err_console).run()
            err_console.print(
                f"[green]done:[/] {result.step} steps, last loss {result.last_loss:.4f}; run saved in {result.run_dir}"
            )
