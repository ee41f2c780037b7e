"""The training loop: objective -> backward -> (all-reduce) -> clip -> AdamW -> EMA, with logging and checkpoints.

Data: a StepLoader (DataLoader workers building whole step batches, eflow_core/data/loader.py) yields the
batch of every step from the start step on, so a resumed run continues the data exactly; batches carry
"video" (encoded here by the autoencoder) or "latents" (used as they are). Files the dataset skips are
counted per reason (metrics "skipped/<reason>", kept in the checkpoint, summarized at the end).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError

from eflow.assembly import Parts, build_dataset, build_parts, resolve_device
from eflow.atomic import atomic_write_text
from eflow.condition import Condition
from eflow.config import RunConfig
from eflow.data.batches import StepBatches, collate
from eflow.data.curriculum import Curriculum
from eflow.data.loader import StepLoader, auto_workers
from eflow.data.resize_crop import to_signed
from eflow.data.skips import SkipLog, take_skips
from eflow.data.video_io import write_grid_png
from eflow.errors import EflowError
from eflow.loaded_run import LoadedRun
from eflow.memory_budget import check_fits, is_out_of_memory, out_of_memory_message, training_need
from eflow.network import DropPlan, Network
from eflow.objective import StepInfo, to_floats
from eflow.parallel.parallelize import parallelize
from eflow.parallel.sequence import data_parallel_world, sequence_mesh
from eflow.registry import get_registry
from eflow.run_dir import CONFIG, METRICS
from eflow.sampling import generate, sample_labels, sampler_name
from eflow.train import checkpoint
from eflow.train.distributed import (
    World,
    all_mean,
    any_rank,
    average_gradients,
    barrier,
    broadcast_parameters,
    init_world,
    shutdown,
)
from eflow.train.ema import EMA
from eflow.train.lr_schedule import learning_rate
from eflow.train.metrics import MetricsLog
from eflow.train.run_lock import RunLock
from eflow.train.stop_signals import StopSignals
from eflow.train.trackers import Trackers, open_trackers

MEMORY_HINT = "--batch-size, --frames or --size"


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`, the same on every rank: the objectives' draws use it, the token-drop plan
    it plus one. Every random draw in a step derives from it (exact resume, any number of GPUs)."""
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def check_writable(run_dir: Path) -> None:
    """Fail early, and clearly, if the run directory cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe.{os.getpid()}"  # one per process: torchrun ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise EflowError(
            f"cannot write to --out {run_dir}: {err.strerror or err}; choose a writable directory"
        ) from None


LABELS = "labels.json"  # the dataset's class names, index = label id


def validation_line(step: int, scores: dict[str, float]) -> str:
    """What a validation printed, e.g. "validation at step 500: FVD 4.21, class accuracy 0.980 (12.3 s)"."""
    parts = [f"FVD {scores['val_fvd']:.2f}"] if "val_fvd" in scores else []
    parts += [f"class accuracy {scores['val_accuracy']:.3f}"] if "val_accuracy" in scores else []
    return f"validation at step {step}: {', '.join(parts)} ({scores.get('val_s', 0.0):.1f} s)"


def progress_info(record: dict) -> str:
    """The progress line's text: loss, speed and what the step really did (dropping, MVA), e.g.
    "loss 0.5424 6.5 it/s stage 0 (drop 0.75)" or "... stage 1 (dense, mva 0.25)"."""
    what = [f"drop {record['drop_ratio']:.2f}" if record["drop_ratio"] > 0 else "dense"]
    if record["mva_share"] > 0:
        what.append(f"mva {record['mva_share']:.2f}")
    return f"loss {record['loss']:.4f} {record['it_s']:.1f} it/s stage {record['stage']} ({', '.join(what)})"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float
    skipped: dict[str, int] | None = None  # skipped files by reason


class TrainingStopped(EflowError):
    """Training was stopped by a signal (SIGINT, SIGTERM): saved at a step boundary, or aborted by a second."""


SMALL_CLIP_TOKENS = 4096  # below this a drop schedule gets a note (Trainer._note_small_drop)


class Trainer:
    """Trains one run as its RunConfig says; `resume` continues the run in cfg.train.out exactly."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        console: Console | None = None,
        progress: bool = True,
    ):
        if resume and overwrite:
            raise EflowError("--resume and --overwrite contradict each other; pass one")
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.run_dir = Path(cfg.train.out)
        self._batch_iter = None  # the loader's iterator, started at the first step run
        self._data_wait = 0.0  # seconds the last step waited for its batch
        self._aside: list[Path] = []  # overwritten runs' files, kept until the first new checkpoint
        self.trackers = Trackers()  # --track: opened by the main rank when the loop starts

    # ----- setup ---------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        has_ckpt = checkpoint.has_checkpoint(self.run_dir)
        if self.resume and not has_ckpt:
            raise EflowError(f"--resume: {self.run_dir} holds no checkpoint to continue")
        if not self.resume and not self.overwrite and has_ckpt:
            default = " (the default run directory)" if self.cfg.train.out == RunConfig().train.out else ""
            raise EflowError(
                f"{self.run_dir}{default} already holds a run; pass --resume to continue it, --overwrite to "
                "start over, or choose another --out"
            )

    def _replace_old_run(self) -> None:
        """--overwrite, once the new run's config and parts are built: move the old run's files aside
        (RUN/.replaced-*, deleted when the new run commits its first checkpoint)."""
        if self.overwrite and checkpoint.has_checkpoint(self.run_dir):
            checkpoint.move_run_aside(self.run_dir)
        self._aside = sorted(self.run_dir.glob(".replaced-*"))  # also those of an overwrite that crashed

    def _setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.world: World = init_world(self.device, timedelta(minutes=cfg.parallel.timeout_minutes))
        if self.world.size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        # the data-parallel replicas: the sp ranks of a sequence-parallel group share one batch and its draws
        self.dp: World = data_parallel_world(self.world, cfg.parallel.sp)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if bf16 else "fp32"
        torch.manual_seed(cfg.train.seed)
        self.parts: Parts = build_parts(cfg)
        self._check_memory()
        self._note_small_drop()
        if cfg.parallel.fsdp and self.world.size == 1:
            self.console.print(
                "[cyan]note:[/] parallel.fsdp (--fsdp) with one process: nothing to shard, the run trains "
                "unsharded; start it with torchrun --nproc-per-node N to shard over N GPUs",
                highlight=False,
            )
        if self.parts.num_classes is not None:
            cfg.data.num_classes = self.parts.num_classes  # resolved: sampling needs no dataset
        self._fit_autoencoder()  # a no-op when config.json already carries the statistics (resume)
        self.model = self.parts.model.to(self.device)
        self.parts.move_to(self.device)
        broadcast_parameters(self.model, self.world)
        self.ema = EMA(self.model, cfg.train.ema_decay)  # a plain copy, taken before any wrapping
        state, saved = None, None
        if self.resume:
            saved = checkpoint.usable_checkpoint(self.run_dir, self._warn)
        # a sharded checkpoint reshards over the ranks of an FSDP run; anything else loads whole, into
        # the plain modules (a model sharded afterwards takes its shards from them)
        reshard = (
            saved is not None and cfg.parallel.fsdp and self.world.size > 1 and checkpoint.is_sharded(saved)
        )
        if saved is not None and not reshard:
            state = checkpoint.load_checkpoint(saved, model=self.model, ema=self.ema.model)
        self._parallelize()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            betas=cfg.train.betas,
        )
        if reshard:
            state = checkpoint.load_sharded_checkpoint(
                saved, model=self.model, optimizer=self.optimizer, ema=self.ema.model
            )
        self.objective = get_registry("objective").create(
            cfg.objective.name, options=cfg.objective.options, total_steps=cfg.train.steps
        )
        self.token_drop = get_registry("token_drop").create(
            cfg.token_drop.name, options=cfg.token_drop.options
        )
        self.curriculum = Curriculum(
            cfg.schedule,
            cfg.data,
            cfg.train.steps,
            lambda *shape: build_dataset(cfg, shape),
            self.parts.dataset,
        )
        self.batches = StepBatches(
            self.curriculum.datasets,
            cfg.train.batch_size,
            cfg.train.seed,
            self.dp.rank,
            self.dp.size,
            dataset_of=self.curriculum.dataset_at,
            image_ratio=cfg.data.image_ratio,
        )
        datasets = self.curriculum.datasets
        self.workers = cfg.train.workers if cfg.train.workers is not None else auto_workers(datasets)
        self.skips = SkipLog(warn=self._warn if self.world.is_main else None)
        self.start_step = 0
        if state is not None:
            if not reshard:  # a resharded load restored the optimizer already
                checkpoint.restore_optimizer(self.optimizer, state["optimizer"], self.run_dir)
                if self.sharded is not None:
                    self.sharded.shard_optimizer_state(self.optimizer)
            self.ema.updates = int(state["ema_updates"])
            self.start_step = int(state["step"])
            self.skips.load_state(state.get("skipped_files", {}))
            if self.start_step >= cfg.train.steps:
                raise EflowError(
                    f"{self.run_dir} is already at step {self.start_step} of {cfg.train.steps}; "
                    "raise --steps to train further"
                )
        for dataset in datasets:  # files the start-up scan left out
            self.skips.add(take_skips(dataset))

    def _parallelize(self) -> None:
        """cfg.parallel on the online model (activation checkpointing, per-block compile, FSDP2 under
        torchrun) and on the EMA copy compile and FSDP2 (no gradients to checkpoint; its sequence stays
        whole: the EMA passes and the previews run it on full clips)."""
        p = self.cfg.parallel
        same_calls = (
            get_registry("objective").get(self.cfg.objective.name).capability("same_calls_every_rank")
        )
        if p.fsdp and self.world.size > 1 and p.fsdp_reshard_after_forward and not same_calls:
            raise EflowError(
                f"parallel.fsdp_reshard_after_forward = true gathers weights per model call, so every rank "
                f"must make the same calls; objective '{self.cfg.objective.name}' skips a pass whose group "
                "is empty on a rank. Set it to false (weights gathered once per step)"
            )
        bf16 = self.precision == "bf16"
        mesh = sequence_mesh(self.world, p.sp, self.device.type) if p.sp > 1 else None
        self.model = parallelize(self.model, p, self.world, self.device, bf16=bf16, mesh=mesh)
        # under FSDP the EMA shards like the model, its weights gathered only for the steps whose
        # objective calls it and for rank 0's previews and validation (eflow.parallel.fsdp); gathered in
        # fp32, so its passes and samples are those of an unsharded EMA
        self.ema.model = parallelize(
            self.ema.model,
            p.model_copy(update={"ac": "off", "sp": 1, "fsdp_reshard_after_forward": False}),
            self.world,
            self.device,
        )
        self.sharded = None
        if p.fsdp and self.world.size > 1:
            from eflow.parallel.fsdp import ShardedStep

            self.sharded = ShardedStep(
                self.model, reshard_after_forward=p.fsdp_reshard_after_forward, ema=self.ema.model
            )

    def _note_small_drop(self) -> None:
        """A note (rank 0) when the schedule drops tokens of clips with few of them: measured at 512 tokens
        on `shapes` (docs/results.md, docs/benchmarks.md "Small runs"), dropping slowed both the steps
        and the learning; the paper drops at 32,760."""
        cfg, parts = self.cfg, self.parts
        if not self.world.is_main or cfg.token_drop.name == "none":
            return
        dropping = [  # (tokens per clip, drop ratio) of every stage that drops
            (
                math.prod(
                    parts.model.token_grid(parts.autoencoder.latent_shape((3, *stage.shape(cfg.data))))
                ),
                stage.drop_ratio,
            )
            for stage in cfg.schedule.stages
            if stage.drop_ratio > 0
        ]
        if not dropping:
            return
        tokens, ratio = min(dropping)
        if tokens < SMALL_CLIP_TOKENS:
            self.console.print(
                f"[cyan]note:[/] {tokens} tokens per clip: the drop stage keeps {math.ceil(tokens * (1 - ratio))} "
                "in the middle blocks. At 512 tokens dropping made the steps slower and the learning slower "
                "on shapes; --token-drop none turns it off; --drop-ratio 0.5 halved the recipe's FVD at 512 "
                "tokens, --drop-until 0.6 helped at 128 only (docs/results.md)",
                highlight=False,
            )

    def _check_memory(self) -> None:
        """Refuse clip sizes and batches that cannot fit the device (a lower bound, before allocating)."""
        cfg, parts = self.cfg, self.parts
        shapes = set(cfg.schedule.shapes(cfg.data))
        keep = 1.0 - min(stage.drop_ratio for stage in cfg.schedule.stages)
        local_batch = -(-cfg.train.batch_size // self.dp.size)
        needs = [
            training_need(
                parts.model,
                shape,
                parts.autoencoder.latent_shape((3, *shape)),
                local_batch,
                self.precision == "bf16",
                middle_keep=keep,
                checkpoint_every=cfg.parallel.checkpoint_every,
                shards=self.world.size if cfg.parallel.fsdp else 1,
                sequence_shards=cfg.parallel.sp,
            )
            for shape in sorted(shapes)
        ]
        check_fits(
            max(needs, key=lambda need: need.total),
            self.device,
            f"lower {MEMORY_HINT} (or use a latent autoencoder)",
        )

    def _fit_autoencoder(self, num: int = 128) -> None:
        """Let an autoencoder that asks for it (`needs_statistics`: the pixel autoencoder's per-channel
        normalization) fit statistics on the dataset's first clips, and record them in the config, so
        config.json carries them to resume and sampling. The clips are the same on every rank and at
        every start, so a refit gives the same numbers."""
        autoencoder, dataset = self.parts.autoencoder, self.parts.dataset
        if not getattr(autoencoder, "needs_statistics", False) or dataset is None or len(dataset) == 0:
            return
        items = [dataset[i] for i in range(min(num, len(dataset)))]
        clips = [to_signed(item["video"]) for item in items if "video" in item]
        if clips:  # pre-encoded latents carry no pixels: the autoencoder encodes nothing
            fitted = autoencoder.fit_statistics(clips)
            self.cfg.data.autoencoder_options = {**self.cfg.data.autoencoder_options, **fitted}

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    # ----- one step ------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        t = self.cfg.train
        return learning_rate(step, t.steps, t.lr, t.warmup_steps, t.lr_schedule, t.min_lr_ratio)

    def _next_batch(self, step: int) -> dict:
        """The batch of `step` from the loader (started at the run's first step), skips recorded."""
        if self._batch_iter is None:
            loader = StepLoader(
                self.batches,
                step,
                self.cfg.train.steps,
                workers=self.workers,
                pin_memory=self.device.type == "cuda",
            )
            self._batch_iter = iter(loader)
        t0 = time.perf_counter()
        batch = next(self._batch_iter)
        self._data_wait = time.perf_counter() - t0
        if batch["step"] != step:
            raise RuntimeError(f"the loader delivered step {batch['step']} for step {step}")
        self.skips.add(batch.pop("skipped"))
        return batch

    def _x0(self, raw: dict) -> torch.Tensor:
        """Clean latents [B, c, t, h, w]: pre-encoded "latents" as they are, else the encoded "video"."""
        if "latents" in raw:
            return raw["latents"].to(self.device, non_blocking=True).float()
        video = to_signed(raw["video"].to(self.device, non_blocking=True))  # uint8 pixels -> [-1, 1]
        with torch.no_grad():
            return self.parts.autoencoder.encode(video).float()

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        # torch's RNG: seeded alike on every rank, and the objectives draw for the global batch and keep
        # their rows (StepInfo.share); the token-drop plan keys its draws by global row and pass. So a
        # sample's noise, times, groups and kept tokens do not depend on the number of GPUs (docs/scaling.md).
        seed = step_seed(cfg.train.seed, step)
        torch.manual_seed(seed)
        raw = self._next_batch(step)
        x0 = self._x0(raw)
        cond = self.parts.conditioner(raw, self.device)
        stage_index, stage = cfg.schedule.stage_at(step, cfg.train.steps)
        ratio = self.token_drop.effective_ratio(cfg.schedule.drop_ratio_at(step, cfg.train.steps))
        rows, start = x0.shape[0], self.dp.rank * x0.shape[0]  # this rank's rows of the global batch
        drop = None
        if ratio > 0:
            drop = DropPlan(self.token_drop, ratio, seed + 1, local_batch=rows, batch_start=start)
        net = Network(self.model, self.ema.model, drop)
        info = StepInfo(
            step=step,
            total_steps=cfg.train.steps,
            mva_share=stage.mva_share,
            stage=stage_index,
            batch_start=start,
            global_batch=self.dp.size * rows,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        self.model.train()
        if self.sharded is not None:
            self.sharded.begin_step(gather_ema=self.objective.uses_ema(info))
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        with autocast:
            out = self.objective.loss(net, {"x0": x0, "cond": cond}, info)
        if self.sharded is not None:
            self.sharded.end_forward()
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = cfg.train.grad_clip
        if self.sharded is None:
            average_gradients(self.model, self.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), clip if clip > 0 else float("inf")
            )
        else:  # FSDP reduce-scatters the gradients (averaged over ranks) into each rank's shard
            self.sharded.reduce_gradients()
            grad_norm = self.sharded.clip_grad_norm_(clip if clip > 0 else float("inf"))
        # the step's one host sync: the loss, the gradient norm and the objective's metrics in one copy
        host = to_floats({**out.metrics, "loss": out.loss, "grad_norm": grad_norm})
        # checked before the weights change; the gradients are averaged, so every rank sees a bad norm
        for name, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
            if not math.isfinite(host[name]):
                raise EflowError(f"{what} is {host[name]} at step {step}; lower --lr or check the data")
        self.optimizer.step()
        self.ema.update(self.model)
        batch = x0.shape[0]
        record = {
            "loss": all_mean(host["loss"], self.world, self.device),
            "grad_norm": host["grad_norm"],
            "lr": self._lr(step),
            "drop_ratio": ratio,
            "stage": stage_index,
            "mva_share": self.objective.effective_mva_share(stage.mva_share),
        }
        # the objective's own "loss" is this rank's; the record keeps the mean over ranks
        record.update({k: v for k, v in host.items() if k not in record})
        record.update({f"passes/{k}": v / batch for k, v in net.counts.items()})
        if self.device.type == "cuda":
            record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record["data_wait_s"] = self._data_wait
        record.update({f"skipped/{reason}": n for reason, n in self.skips.counts().items()})
        return record

    # ----- outputs -------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Commit the checkpoint of `step` (the number of optimizer steps applied): under FSDP sharded,
        every rank writing its shards (checkpoint.save_sharded_checkpoint); else rank 0 writes it whole.

        No random state is saved: the objectives' and the token-drop plan's draws of step k derive from
        (seed, k), and the data of step k from (seed, k), so the step number is the whole position of
        the run, on any number of GPUs."""
        try:
            if self.sharded is not None:
                checkpoint.save_sharded_checkpoint(
                    self.run_dir,
                    config_json=self.cfg.to_json(),
                    model=self.model,
                    optimizer=self.optimizer,
                    ema=self.ema.model,
                    state={
                        "step": step,
                        "ema_updates": self.ema.updates,
                        "skipped_files": self.skips.state(),
                    },
                    world=self.world,
                    keep=self.cfg.train.keep_checkpoints,
                )
            elif self.world.is_main:
                state = {
                    "step": step,
                    "optimizer": self.optimizer.state_dict(),
                    "ema_updates": self.ema.updates,
                    "skipped_files": self.skips.state(),
                }
                checkpoint.save_checkpoint(
                    self.run_dir,
                    config_json=self.cfg.to_json(),
                    model=self.model,
                    ema=self.ema.model,
                    state=state,
                    keep=self.cfg.train.keep_checkpoints,
                )
            else:
                return
        except (OSError, SafetensorError) as err:  # a full disk, a quota, a vanished mount
            last = checkpoint.latest_checkpoint(self.run_dir)
            kept = f"{last.name} is intact" if last is not None else "no checkpoint was committed yet"
            raise EflowError(
                f"cannot write the checkpoint of step {step} to {self.run_dir}: {getattr(err, 'strerror', None) or err}"
                f"; {kept}; free space and continue with --resume"
            ) from None
        if self.world.is_main:  # the new run has a checkpoint: the overwritten one can go
            for aside in self._aside:
                shutil.rmtree(aside, ignore_errors=True)
        self._aside = []

    def _ema_whole(self):
        """A context in which rank 0 may run the EMA alone: under FSDP every rank gathers its weights
        (every rank enters); else nothing to do."""
        if self.sharded is None:
            return nullcontext()
        from eflow.parallel.fsdp import gathered

        return gathered(self.ema.model)

    def preview(self, step: int) -> Path | None:
        """A PNG frame grid of EMA samples (one row per class) under samples/, written by rank 0 (every
        rank calls)."""
        with self._ema_whole():
            return self._preview(step) if self.world.is_main else None

    def _preview(self, step: int) -> Path:
        cfg = self.cfg
        num = min(cfg.sample.num, 8)
        if self.parts.num_classes is not None:
            cond = Condition(labels=sample_labels(num, self.parts.num_classes, None))
        else:
            cond = self._preview_text(num)
        videos = generate(
            self.ema.model,
            self.parts.autoencoder,
            cond,
            self.parts.latent_shape,
            sampler=sampler_name(cfg),
            sampler_options=cfg.sample.sampler_options,
            steps=cfg.sample.steps,
            guidance=cfg.sample.guidance,
            seed=cfg.sample.seed,
            device=self.device,
            precision=self.precision,
        )
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_grid_png(path, videos)
        self.trackers.image(step - 1, "preview", path)  # at the index of the last step it shows
        return path

    def _preview_text(self, num: int) -> Condition:
        """Text conditions of the dataset's first `num` items: captions (read without decoding when
        the dataset has a `caption(i)` method) or pre-computed embeddings."""
        dataset = self.parts.dataset
        num = min(num, len(dataset))
        caption = getattr(dataset, "caption", None)
        if callable(caption):
            return self.parts.conditioner.captions([caption(i) for i in range(num)], self.device)
        items = [dataset[i] for i in range(num)]
        if "caption" in items[0]:
            return self.parts.conditioner.captions([it["caption"] for it in items], self.device)
        batch = collate(items)
        return self.parts.conditioner.embeddings(batch["text"], batch["text_mask"], self.device)

    def _validation_settings(self):
        """cfg.validation as eflow eval's settings (accuracy only for label-conditioned runs)."""
        from eflow.eval.evaluate import EvalSettings

        v, cfg = self.cfg.validation, self.cfg
        return EvalSettings(
            metrics=[m for m in v.metrics if m != "accuracy" or cfg.data.condition == "label"],
            extractor=v.extractor,
            extractor_options=dict(v.extractor_options),
            num=v.num,
            batch_size=v.batch_size,
            device=str(self.device),
        )

    def validate(self, step: int) -> dict[str, float]:
        """eflow eval's core on the EMA weights after `step` steps (cfg.validation): val_fvd and/or
        val_accuracy, and val_s, the seconds it took, on rank 0 (every rank calls; the others get {}).
        Sampling draws from its own seeded generators and every training step reseeds the global RNG, so
        a run with validation trains exactly as one without."""
        with self._ema_whole():
            return self._validate(step) if self.world.is_main else {}

    def _validate(self, step: int) -> dict[str, float]:
        from eflow.eval.evaluate import evaluate_run

        run = LoadedRun(
            self.run_dir,
            self.cfg.model_copy(deep=True),  # evaluate_run sets its sample section
            replace(self.parts, model=self.ema.model),
            step,
            "ema",
            self.device,
            self.precision,
        )
        t0 = time.perf_counter()
        report = evaluate_run(run, self._validation_settings())
        out = {f"val_{name}": float(value) for name, value in report["metrics"].items()}
        out["val_s"] = time.perf_counter() - t0
        return out

    def _write_labels(self) -> None:
        """labels.json: the dataset's class names (index = label id), when it has them."""
        classes = getattr(self.parts.dataset, "classes", None)
        if classes is not None:
            text = json.dumps({"classes": [str(c) for c in classes]}, indent=1) + "\n"
            atomic_write_text(self.run_dir / LABELS, text)

    # ----- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        check_writable(self.run_dir)
        lock = RunLock(self.run_dir)
        is_main_process = int(os.environ.get("RANK", "0")) == 0
        if is_main_process:
            lock.acquire()  # before looking at the directory: a second `eflow train` stops here
        try:
            with StopSignals() as stop:
                return self._run(stop)
        finally:
            self.trackers.close()
            lock.release()

    def _kept(self) -> str:
        """What a failed run leaves to resume from."""
        saved = checkpoint.latest_checkpoint(self.run_dir)
        return "nothing was saved" if saved is None else f"{saved.name} is intact; continue with --resume"

    def _run(self, stop: StopSignals) -> TrainResult:
        self._check_run_dir()
        self._setup()  # config, plugins and parts are all built before anything in the directory changes
        cfg, main = self.cfg, self.world.is_main
        if main and cfg.validation.every:  # a missing classifier fails now, not after `every` steps
            from eflow.eval.evaluate import load_extractors

            load_extractors(cfg, self._validation_settings(), self.parts.num_classes, torch.device("cpu"))
        if main:
            self._replace_old_run()
            for leftover in checkpoint.clean_leftovers(self.run_dir):
                self._warn(f"removed {leftover.name}, left by an interrupted save")
            atomic_write_text(self.run_dir / CONFIG, cfg.to_json())
            self._write_labels()
        log = MetricsLog(self.run_dir / METRICS, self.start_step if self.resume else None) if main else None
        if main:
            config = cfg.model_dump(mode="json")
            self.trackers = open_trackers(cfg.train.track, self.run_dir, self.start_step, config, self._warn)
        total = cfg.train.steps
        done = self.start_step
        last_loss = float("nan")
        progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (main and self.show_progress),
        )
        try:
            with progress:
                task = progress.add_task("train", total=total, completed=done, info="")
                t_last = time.perf_counter()
                for step in range(self.start_step, total):
                    record = self.train_step(step)
                    done = step + 1  # steps applied
                    last_loss = record["loss"]
                    now = time.perf_counter()
                    record.update(step=step, it_s=1.0 / max(now - t_last, 1e-9), time=time.time())
                    if cfg.validation.every and done % cfg.validation.every == 0:
                        scores = self.validate(done)  # after it_s: its time is not the step's
                        record.update(scores)
                        if scores:  # rank 0
                            self.console.print(validation_line(done, scores), highlight=False)
                    t_last = time.perf_counter()
                    if log is not None and (step % cfg.train.log_every == 0 or done == total):
                        log.write(record)
                        self.trackers.log(step, record)
                    progress.update(task, completed=done, info=progress_info(record))
                    if any_rank(stop.received is not None, self.world, self.device) and done < total:
                        self.save(done)
                        raise TrainingStopped(
                            f"stopped by {stop.received or 'a signal to another rank'} after step {done}; "
                            f"the run is saved in {self.run_dir}; continue with --resume"
                        )
                    if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total:
                        self.save(done)
                    if cfg.train.preview_every and done % cfg.train.preview_every == 0 and done < total:
                        self.preview(done)
        except KeyboardInterrupt:  # a second signal, or an interrupt raised inside a step: save nothing
            raise TrainingStopped(f"aborted during step {done + 1}; {self._kept()}") from None
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise EflowError(
                out_of_memory_message(
                    err, f"in step {done + 1} on {self.device}", f"lower {MEMORY_HINT}; {self._kept()}"
                )
            ) from None
        finally:
            if log is not None:
                log.close()
            self._batch_iter = None  # stops the loader's workers
        self.save(total)
        self.preview(total)
        if main and self.skips.summary():
            self.console.print(f"[yellow]data:[/] {self.skips.summary()} (see the warnings above)")
        barrier(self.world)
        shutdown(self.world)
        return TrainResult(self.run_dir, total, last_loss, self.skips.counts())
