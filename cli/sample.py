"""`eflow sample RUN_DIR`: load a run's resolved config and weights, sample, write mp4 + gif + PNG grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eflow.cli.errors import err_console, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def sample(
        run_dir: Annotated[Path, typer.Argument(help="a run directory written by `eflow train`")],
        steps: Annotated[
            int | None, typer.Option(help="sampling steps (default: the run's, EFlow: 4)")
        ] = None,
        guidance: Annotated[float | None, typer.Option(help="guidance scale w (EFlow: 4.0)")] = None,
        label: Annotated[
            int | None, typer.Option(help="class id for every video (default: classes in turn)")
        ] = None,
        caption: Annotated[
            list[str] | None, typer.Option(help="caption(s) for text-conditioned runs")
        ] = None,
        num: Annotated[int | None, typer.Option(help="number of videos")] = None,
        seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
        sampler: Annotated[str | None, typer.Option(help="sampler (default: the objective's own)")] = None,
        weights: Annotated[str, typer.Option(help="ema or model (online) weights")] = "ema",
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
        out: Annotated[Path | None, typer.Option(help="output directory (default: RUN_DIR/samples)")] = None,
    ) -> None:
        """Sample videos from a trained run."""
        from eflow.assembly import resolve_device
        from eflow.condition import Condition
        from eflow.errors import ConfigError, EflowError
        from eflow.loaded_run import load_run
        from eflow.sampling import generate, sample_labels, sampler_name, write_samples

        with user_errors():
            run = load_run(run_dir, resolve_device(device), weights)
            cfg, parts, dev, step = run.cfg, run.parts, run.device, run.step
            if sampler is not None:
                cfg.sample.sampler = sampler
            steps_ = cfg.sample.steps if steps is None else steps
            w = cfg.sample.guidance if guidance is None else guidance
            model = parts.model
            n = num if num is not None else (len(caption) if caption else cfg.sample.num)
            if n < 1 or steps_ < 1:
                raise ConfigError("--num and --steps must be at least 1")
            if cfg.data.condition == "text":
                texts = caption or ["a red square moving left"]
                texts = [texts[i % len(texts)] for i in range(n)]
                cond = parts.conditioner.captions(texts, dev)
            else:
                if caption:
                    raise ConfigError(
                        "--caption needs a text-conditioned run (data.condition = text); use --label"
                    )
                cond = Condition(labels=sample_labels(n, parts.num_classes, label))
            name = sampler_name(cfg)
            videos = generate(
                model,
                parts.autoencoder,
                cond,
                parts.latent_shape,
                sampler=name,
                sampler_options=cfg.sample.sampler_options,
                steps=steps_,
                guidance=w,
                seed=cfg.sample.seed if seed is None else seed,
                device=dev,
                precision=run.precision,
            )
            out_dir = out or run_dir / "samples"
            try:
                paths = write_samples(videos, out_dir, cfg.sample.fps)
            except OSError as err:
                raise EflowError(f"cannot write to --out {out_dir}: {err.strerror or err}") from None
            err_console.print(
                f"[green]sampled[/] {n} videos with '{name}' ({steps_} steps, w={w}) from {weights} weights "
                f"at step {step}:"
            )
            for kind, path in paths.items():
                typer.echo(f"  {kind}: {path}")
