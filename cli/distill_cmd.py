"""`eflow distill`: Efficient-vDiT's pipeline from a trained flow-matching teacher (docs/distillation.md).

    eflow distill --teacher RUN --out NEW          multi-step latent consistency distillation (MLCD)
    eflow distill tiles --teacher RUN --out NEW    per-layer attention-tile search (no training)
    eflow distill pipeline --teacher RUN --out DIR tiles -> attention distillation -> MLCD, resumable

Each result is a run directory for `eflow sample` and `eflow eval`. The commands parse and call
eflow.distill.stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eflow.cli.errors import err_console, user_errors
from eflow.cli.options import choices

MLCD, TILES, TRAIN = "MLCD", "Tile search", "Training"

Teacher = Annotated[
    Path | None, typer.Option(help="the teacher: a flow-matching run directory (objective fm)")
]
Segments = Annotated[
    int, typer.Option(help="trajectory segments = sampling steps", min=1, rich_help_panel=MLCD)
]
Guidance = Annotated[
    float, typer.Option(help="CFG scale of the teacher's steps = the student's w", rich_help_panel=MLCD)
]
Shift = Annotated[float, typer.Option(help="time-grid shift (the teacher's euler: 3)", rich_help_panel=MLCD)]
TeacherSteps = Annotated[
    int | None, typer.Option(help="teacher Euler steps over [0, 1] (default 48)", rich_help_panel=MLCD)
]
Skip = Annotated[
    int | None,
    typer.Option(help="grid steps per teacher step (LCM's skipping step)", rich_help_panel=MLCD),
]
Budget = Annotated[
    float, typer.Option(help="per-layer attention FLOPs, fraction of dense", rich_help_panel=TILES)
]
Threshold = Annotated[
    float | None,
    typer.Option(help="cheapest mask with relative error <= this (Algorithm 1's r)", rich_help_panel=TILES),
]
Clips = Annotated[int, typer.Option(help="calibration clips from the teacher's data", rich_help_panel=TILES)]
MaxReference = Annotated[int, typer.Option(help="largest R (reference frames) tried", rich_help_panel=TILES)]
MaxWindow = Annotated[int, typer.Option(help="largest frame window w tried", rich_help_panel=TILES)]
BatchSize = Annotated[int | None, typer.Option(help="global batch size", rich_help_panel=TRAIN)]
Lr = Annotated[float | None, typer.Option(help="AdamW learning rate", rich_help_panel=TRAIN)]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N", rich_help_panel=TRAIN)]
Seed = Annotated[int | None, typer.Option(help="seed of the runs", rich_help_panel=TRAIN)]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="override any field of the student: --set train.save_every=100"),
]

distill_app = typer.Typer(
    help="Distill a flow-matching teacher (Efficient-vDiT). Without a command, `eflow distill --teacher RUN "
    "--out NEW` runs MLCD (multi-step consistency distillation; --teacher and --out are required); "
    "`tiles` searches per-layer attention tiles, `pipeline` runs the whole three stages.",
    no_args_is_help=True,
)


def _train(batch_size: int | None, lr: float | None, device: str | None, seed: int | None) -> dict[str, Any]:
    given = {"batch_size": batch_size, "lr": lr, "device": device, "seed": seed}
    return {k: v for k, v in given.items() if v is not None}


def _mlcd(
    segments: int, steps: int, guidance: float, shift: float, teacher_steps: int | None, skip: int | None
) -> dict[str, Any]:
    """mlcd_stage's keywords from the MLCD flags (the objective options only where given)."""
    options = {k: v for k, v in (("teacher_steps", teacher_steps), ("skip", skip)) if v is not None}
    return {"segments": segments, "steps": steps, "guidance": guidance, "shift": shift, "options": options}


def _report(result) -> None:
    color = {"skipped": "yellow"}.get(result.status, "green")
    detail = f" ({result.detail})" if result.detail else ""
    err_console.print(
        f"[{color}]{result.stage}: {result.status}[/] {result.run_dir}{detail}", highlight=False
    )


def _need(teacher: Path | None, out: Path | None, command: str) -> tuple[Path, Path]:
    if teacher is None or out is None:
        missing = " and ".join(f for f, v in (("--teacher", teacher), ("--out", out)) if v is None)
        from eflow.errors import EflowError

        raise EflowError(f"`eflow {command}` needs {missing}")
    return teacher, out


@distill_app.callback(invoke_without_command=True)
def distill(
    ctx: typer.Context,
    teacher: Teacher = None,
    out: Annotated[Path | None, typer.Option(help="the student's run directory")] = None,
    segments: Segments = 4,
    steps: Annotated[int, typer.Option(help="optimizer steps", rich_help_panel=TRAIN)] = 1000,
    attn: Annotated[
        str | None, typer.Option(help=f"the student's attention backend: {choices('attention')}")
    ] = None,
    guidance: Guidance = 4.0,
    shift: Shift = 3.0,
    teacher_steps: TeacherSteps = None,
    skip: Skip = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    device: Device = None,
    seed: Seed = None,
    set_: Sets = None,
) -> None:
    """Multi-step latent consistency distillation (MLCD) of a teacher run into a few-step student.

    The student starts from the teacher's weights (with --attn, another attention backend) and samples
    with `segment`, one jump per segment. A run already in --out continues; a finished one is left as it is.
    """
    if ctx.invoked_subcommand is not None:
        if teacher is not None or out is not None:
            with user_errors():
                from eflow.errors import EflowError

                raise EflowError(
                    f"give --teacher and --out after the subcommand: eflow distill {ctx.invoked_subcommand} "
                    "--teacher RUN --out DIR"
                )
        return
    from eflow.distill.stages import mlcd_stage

    with user_errors():
        teacher, out = _need(teacher, out, "distill")
        result = mlcd_stage(
            teacher,
            teacher,
            out,
            **_mlcd(segments, steps, guidance, shift, teacher_steps, skip),
            attention=attn,
            train=_train(batch_size, lr, device, seed),
            sets=set_,
            console=err_console,
        )
        _report(result)


@distill_app.command("tiles")
def tiles(
    teacher: Teacher = None,
    out: Annotated[Path | None, typer.Option(help="the tile student's run directory")] = None,
    budget: Budget = 0.5,
    threshold: Threshold = None,
    clips: Clips = 8,
    max_reference: MaxReference = 2,
    max_window: MaxWindow = 1,
    batch_size: Annotated[int, typer.Option(help="calibration clips per forward", rich_help_panel=TILES)] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the calibration clips")] = 0,
    set_: Sets = None,
) -> None:
    """Search every layer's attention-tile mask against the teacher's attention on calibration clips.

    Writes a run (the teacher's weights, `tile` attention with the per-block masks) and its tiles.json.
    """
    from eflow.distill.stages import TILES_JSON, tiles_stage

    with user_errors():
        teacher, out = _need(teacher, out, "distill tiles")
        result, search = tiles_stage(
            teacher,
            out,
            budget=budget,
            threshold=threshold,
            clips=clips,
            batch_size=batch_size,
            max_reference=max_reference,
            max_window=max_window,
            device=device,
            seed=seed,
            sets=set_,
        )
        _report(result)
        if search is not None:
            for c in search.choices:
                mask = ", ".join(f"{k}={v}" for k, v in c.options.items())
                flag = " (over budget)" if c.over_budget else ""
                typer.echo(f"  block {c.block}: {mask}  cost {c.cost:.3f}  error {c.error:.2e}{flag}")
            typer.echo(f"  table: {out / TILES_JSON}")


@distill_app.command("pipeline")
def pipeline(
    teacher: Teacher = None,
    out: Annotated[Path | None, typer.Option(help="folder of the stages' runs")] = None,
    segments: Segments = 4,
    steps: Annotated[int, typer.Option(help="MLCD optimizer steps", rich_help_panel=TRAIN)] = 1000,
    attn_steps: Annotated[
        int, typer.Option(help="attention-distillation optimizer steps", rich_help_panel=TRAIN)
    ] = 500,
    guidance: Guidance = 4.0,
    shift: Shift = 3.0,
    teacher_steps: TeacherSteps = None,
    skip: Skip = None,
    budget: Budget = 0.5,
    threshold: Threshold = None,
    clips: Clips = 8,
    max_reference: MaxReference = 2,
    max_window: MaxWindow = 1,
    batch_size: BatchSize = None,
    lr: Lr = None,
    device: Device = None,
    seed: Seed = None,
    set_: Sets = None,
) -> None:
    """Efficient-vDiT's pipeline: tile search -> attention distillation -> MLCD, one run per stage.

    OUT/1-tiles, OUT/2-attention, OUT/3-mlcd; run it again to continue: finished stages are skipped.
    --set applies to every stage's config (objective options: use the flags).
    """
    from eflow.distill.stages import run_pipeline

    with user_errors():
        teacher, out = _need(teacher, out, "distill pipeline")
        run_pipeline(
            teacher,
            out,
            tiles={
                "budget": budget,
                "threshold": threshold,
                "clips": clips,
                "max_reference": max_reference,
                "max_window": max_window,
                "seed": 0 if seed is None else seed,
            },
            attention={"steps": attn_steps},
            mlcd=_mlcd(segments, steps, guidance, shift, teacher_steps, skip),
            train=_train(batch_size, lr, device, seed),
            sets=set_,
            console=err_console,
            on_stage=_report,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(distill_app, name="distill")
