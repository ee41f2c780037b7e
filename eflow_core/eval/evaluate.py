"""`eflow eval RUN_DIR`: FVD against real clips and sample class accuracy for one trained run.

1. Load the run (config.json, EMA weights) and build the real dataset at the run's clip shape
   (`--real`, default the run's dataset with its options and seed).
2. FVD: real statistics of N real clips through the extractor (cached, see real_stats.py).
3. Generate N clips with the run's sampler (`eflow.sampling.generate`), batch by batch; labels go
   through the classes in turn (balanced), captions of text-conditioned runs are those of the
   real subset. Batch b uses sampling seed `seed * 1_000_003 + b`. Each batch is quantized to uint8
   and its features accumulated (`FeatureStats`) and/or classified (`ClassTally`), then dropped, so
   memory does not grow with N.
4. Fréchet distance in float64 with the chosen covariance convention; the record of every
   protocol detail goes into the report (eval.json, see report.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.progress import Progress

from eflow.assembly import resolve_device
from eflow.condition import Condition
from eflow.config import SampleSection, sampling_settings
from eflow.errors import ConfigError, EflowError
from eflow.eval.accuracy import ClassTally
from eflow.eval.classifier import resolve_dataset_options
from eflow.eval.clips import subset_indices
from eflow.eval.extractor import create_extractor, describe, extract, metric_label, to_uint8
from eflow.eval.frechet import COVARIANCE_CHOICES, COVARIANCE_LABELS, FeatureStats, frechet_between
from eflow.eval.real_stats import real_statistics, stats_record
from eflow.loaded_run import LoadedRun, load_run
from eflow.memory_budget import check_fits, sampling_need
from eflow.registry import get_registry

METRICS = ("fvd", "accuracy")


@dataclass
class EvalSettings:
    """What `eflow eval` was asked for (the CLI's options)."""

    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    extractor: str = "indomain"  # feature extractor for FVD (registry 'feature_extractor')
    extractor_options: dict[str, Any] = field(default_factory=dict)
    num: int = 2048  # real clips and generated clips
    steps: int | None = None  # sampling steps (None: the run's)
    guidance: float | None = None  # guidance scale (None: the run's)
    sampler: str | None = None  # sampler (None: the run's)
    sampler_options: dict[str, Any] = field(default_factory=dict)  # over the run's, e.g. {"shift": 1.0}
    seed: int = 0  # sampling seed and real-subset seed
    batch_size: int = 64  # clips per generation / extraction batch
    device: str = "auto"
    weights: str = "ema"
    real: str | None = None  # real dataset (None: the run's)
    cov: str = "n-1"  # covariance convention: n-1 or n
    cache_dir: str | None = None
    use_cache: bool = True  # read cached real statistics

    def check(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(
                f"--metric {','.join(self.metrics) or '(empty)'}: choose from {', '.join(METRICS)}"
            )
        if self.cov not in COVARIANCE_CHOICES:
            raise ConfigError(f"--cov {self.cov!r}: choose {' or '.join(COVARIANCE_CHOICES)}")
        if self.num < 2:
            raise ConfigError(f"--num must be at least 2 (a covariance needs two clips), got {self.num}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        sampling_settings(SampleSection(), steps=self.steps, guidance=self.guidance)  # bounds, named by flag
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        get_registry("feature_extractor").get(self.extractor)  # unknown name: lists the choices


def evaluate(run_dir: str | Path, settings: EvalSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Run the evaluation of a run directory; returns the report (what eval.json holds)."""
    settings.check()
    run = load_run(run_dir, resolve_device(settings.device), settings.weights)
    return evaluate_run(run, settings, progress)


def evaluate_run(run: LoadedRun, settings: EvalSettings, progress: Progress | None = None) -> dict[str, Any]:
    """The evaluation of a run already in memory (its model on run.device): what `evaluate` does after
    loading, and what validation during training calls with the EMA model. Sets run.cfg.sample to the
    settings' sampling flags."""
    settings.check()
    t_start = time.perf_counter()
    device = run.device
    cfg = run.cfg
    clip = (cfg.data.frames, cfg.data.height, cfg.data.width)
    if settings.sampler is not None:
        get_registry("sampler").get(settings.sampler)
    asked = sampling_settings(
        cfg.sample,
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        sampler_options=settings.sampler_options,
    )
    from eflow.sampling import sampler_name, sampling_notes

    notes = sampling_notes(cfg, asked)  # against the run's own sample section, before it is replaced
    cfg.sample = asked

    sampler = sampler_name(cfg)
    get_registry("sampler").get(sampler).parse_options(cfg.sample.sampler_options)  # a bad option: named
    steps, guidance = cfg.sample.steps, cfg.sample.guidance
    batch = min(settings.batch_size, settings.num)
    check_fits(
        sampling_need(run.parts.model, clip, run.parts.latent_shape, batch, run.precision == "bf16"),
        device,
        "lower --batch-size",
    )

    want_fvd, want_acc = "fvd" in settings.metrics, "accuracy" in settings.metrics
    real_name = settings.real or cfg.data.name
    real_options = resolve_dataset_options(real_name, cfg.data.options if real_name == cfg.data.name else {})
    real_dataset = None  # only FVD reads real clips (and the captions of text-conditioned runs)
    if want_fvd:
        real_dataset = get_registry("dataset").create(
            real_name, *clip, seed=cfg.train.seed, options=real_options
        )

    classifier, extractor = load_extractors(cfg, settings, run.parts.num_classes, device)
    tally = ClassTally(run.parts.num_classes, classifier.classes) if classifier is not None else None

    report: dict[str, Any] = {
        "eflow_version": _version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "dir": str(run.run_dir),
            "step": run.step,
            "weights": run.weights,
            "preset": cfg.model.preset,
            "attention": cfg.model.attention,
            "objective": cfg.objective.name,
            "dataset": cfg.data.name,
        },
        "clip": {"frames": clip[0], "height": clip[1], "width": clip[2]},
        "sampling": {
            "sampler": sampler,
            "sampler_options": dict(cfg.sample.sampler_options),
            "steps": steps,
            "guidance": guidance,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "batch_seeds": "seed * 1000003 + batch index",
            "precision": run.precision,
            "device": str(device),
            "conditions": "classes in turn (balanced)"
            if cfg.data.condition == "label"
            else "captions of the real subset",
            "notes": notes,  # settings the run was not trained for (eflow.sampling.sampling_notes)
        },
        "metrics": {},
        "timing_s": {},
    }

    real_stats = None
    if want_fvd:
        t0 = time.perf_counter()
        record = stats_record(
            real_name, real_options, cfg.train.seed, clip, extractor, settings.num, settings.seed
        )
        real_stats, cache_info = real_statistics(
            real_dataset,
            record,
            extractor,
            settings.batch_size,
            settings.cache_dir,
            settings.use_cache,
            progress,
        )
        report["timing_s"]["real_stats"] = round(time.perf_counter() - t0, 3)
        real_info = {
            "dataset": real_name,
            "dataset_options": real_options,
            "dataset_seed": cfg.train.seed,
            "subset_seed": settings.seed,
            **cache_info,
        }

    t0 = time.perf_counter()
    fake_stats = FeatureStats(extractor.dim) if want_fvd else None
    _generate_and_measure(
        run,
        real_dataset,
        settings,
        sampler,
        steps,
        guidance,
        extractor,
        fake_stats,
        classifier,
        tally,
        progress,
    )
    report["timing_s"]["generate_and_measure"] = round(time.perf_counter() - t0, 3)

    if want_fvd:
        ddof = COVARIANCE_CHOICES[settings.cov]
        result = frechet_between(real_stats, fake_stats, ddof=ddof)
        label = metric_label(extractor)
        report["metric_label"] = label
        report["metrics"]["fvd"] = result.value
        report["fvd"] = {
            "value": result.value,
            "label": label,
            "comparable_to_published_fvd": _standard_i3d_protocol(extractor),
            "extractor": describe(extractor),
            "n_real": real_stats.n,
            "n_fake": fake_stats.n,
            "feature_dim": real_stats.dim,  # with n <= dim a covariance is singular: FVD means little
            "covariance": COVARIANCE_LABELS[ddof],
            "eps_added": result.eps_added,
            "sqrtm_imag_max": result.imag_max,
            "raw_value": result.raw,
            "real": real_info,
        }
    if want_acc:
        summary = tally.summary()
        report["metrics"]["accuracy"] = summary["accuracy"]
        report["accuracy"] = {
            "value": summary["accuracy"],
            "n": summary["n"],
            "per_class": summary["per_class"],
            "classifier": {
                "path": str(classifier.path),
                "content_hash": classifier.content_hash,
                "heldout_accuracy": classifier.meta["heldout"]["accuracy"],
            },
        }
    report["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return report


def load_extractors(cfg, settings: EvalSettings, num_classes: int | None, device) -> tuple[Any, Any]:
    """(the accuracy classifier, the FVD extractor) that the settings' metrics need for a run of `cfg`
    with `num_classes` classes, on `device` (None where a metric is not wanted). A missing classifier or
    weights file is an EflowError naming the command that makes it; the trainer calls this before its
    first step when it validates, so that error comes at start-up."""
    classifier = extractor = None
    if "accuracy" in settings.metrics:
        classifier = _accuracy_classifier(cfg, num_classes, settings, device)
    if "fvd" in settings.metrics:
        clip = (cfg.data.frames, cfg.data.height, cfg.data.width)
        real_name = settings.real or cfg.data.name
        context = {
            "dataset": real_name,
            "dataset_options": resolve_dataset_options(
                real_name, cfg.data.options if real_name == cfg.data.name else {}
            ),
            "clip_frames": clip[0],
            "clip_height": clip[1],
            "clip_width": clip[2],
            "cache_dir": settings.cache_dir,
        }
        extractor = create_extractor(settings.extractor, settings.extractor_options, context)
        if hasattr(extractor, "check_clip_shape"):
            extractor.check_clip_shape((3, *clip))
        if hasattr(extractor, "to"):
            extractor = extractor.to(device) or extractor
    return classifier, extractor


def _accuracy_classifier(cfg, num_classes: int | None, settings: EvalSettings, device):
    """The in-domain classifier of the run's dataset and clip shape, on `device`."""
    if cfg.data.condition != "label":
        raise EflowError("--metric accuracy needs a label-conditioned run; this run is conditioned on text")
    options = resolve_dataset_options(cfg.data.name, cfg.data.options)
    context = {
        "dataset": cfg.data.name,
        "dataset_options": options,
        "clip_frames": cfg.data.frames,
        "clip_height": cfg.data.height,
        "clip_width": cfg.data.width,
        "cache_dir": settings.cache_dir,
    }
    classifier = create_extractor("indomain", {}, context).to(device)
    if len(classifier.classes) != num_classes:
        raise EflowError(
            f"the in-domain classifier {classifier.path} knows {len(classifier.classes)} classes but the "
            f"run has {num_classes}; retrain it with `eflow eval train-extractor`"
        )
    return classifier


def _generate_and_measure(
    run, real_dataset, settings, sampler, steps, guidance, extractor, fake_stats, classifier, tally, progress
) -> None:
    """Generate settings.num clips batch by batch; accumulate features and/or class predictions."""
    from eflow.sampling import generate, sample_labels

    cfg, parts, num = run.cfg, run.parts, settings.num
    captions = None
    if cfg.data.condition == "text":
        indices = subset_indices(len(real_dataset), num, settings.seed)
        captions = [real_dataset[i]["caption"] for i in indices]
        captions = [captions[i % len(captions)] for i in range(num)]
    else:
        labels = sample_labels(num, parts.num_classes, None)
    task = progress.add_task("generate", total=num, info=f"{sampler}, {steps} steps") if progress else None
    for b, start in enumerate(range(0, num, settings.batch_size)):
        stop = min(start + settings.batch_size, num)
        if captions is not None:
            cond = parts.conditioner.captions(captions[start:stop], run.device)
        else:
            cond = Condition(labels=labels[start:stop])
        videos = generate(
            parts.model,
            parts.autoencoder,
            cond,
            parts.latent_shape,
            sampler=sampler,
            sampler_options=cfg.sample.sampler_options,
            steps=steps,
            guidance=guidance,
            seed=settings.seed * 1_000_003 + b,
            device=run.device,
            precision=run.precision,
        )
        clips = to_uint8(videos)
        if fake_stats is not None:
            fake_stats.update(extract(extractor, clips))
        if tally is not None:
            tally.update(labels[start:stop], classifier.classify(clips))
        if task is not None:
            progress.update(task, advance=stop - start)


def _standard_i3d_protocol(extractor) -> bool:
    """i3d with 16 frames and StyleGAN-V's call: the protocol of published FVD (the weights must also be
    StyleGAN-V's file, which only its hash can tell)."""
    protocol = extractor.protocol
    return (
        extractor.name == "i3d"
        and protocol.get("frames") == 16
        and "rescale=True" in protocol.get("call", "")
    )


def _version() -> str:
    from eflow import __version__

    return __version__
