"""`eflow sample` as a function: a loaded run + flags -> the Pipeline's batches -> one set of files.

Generation is eflow.pipeline's (the Python API): videos are generated `sample.batch_size` at a time,
batch b seeded with seed + b * 1,000,003 (the videos depend on the seed and the batch size; a call of at
most batch_size videos is one batch). Here: the flags' checks, the grid (mp4, gif, PNG) of the first
MAX_GRID videos, and with `each` every video as videos/NNNNNN.mp4. All files of one call replace the
previous call's together (eflow.output_set).

Under torchrun with P processes, `sample_run_dir(..., sp=N)` samples on P / N groups of N ranks
(a Share each). Within a group (Ulysses, eflow.parallel.sequence) the model's blocks are split over
the N ranks, which make the same calls with the same noise and conditions, so each model call runs
once, spread over them; the group's first rank decodes. The groups take the batches in turn (group g:
batches g, g + P / N, ...); each batch's seed depends on its index alone, so the videos are one
process's. After each round of batches rank 0 gathers the groups' videos and writes them, in order.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from eflow.assembly import resolve_device
from eflow.data.video_io import from_uint8, to_uint8, write_mp4
from eflow.errors import ConfigError, EflowError
from eflow.loaded_run import LoadedRun, load_run
from eflow.memory_budget import is_out_of_memory, out_of_memory_message
from eflow.output_set import output_set
from eflow.pipeline import BATCH_SEED_STRIDE, DEFAULT_CAPTION, Pipeline, generate
from eflow.run_dir import CHECKPOINTS, step_of
from eflow.sampling import write_samples
from eflow.train.distributed import World, init_world, shutdown

__all__ = [
    "BATCH_SEED_STRIDE",
    "DEFAULT_CAPTION",
    "MAX_GRID",
    "SampleResult",
    "Share",
    "check_processes",
    "gathered",
    "idle_groups_note",
    "sample_run",
    "sample_run_dir",
    "split_over_group",
]

MAX_GRID = 64  # videos in the mosaic and the PNG grid


@dataclass
class SampleResult:
    """What one `eflow sample` call wrote."""

    num: int
    sampler: str
    steps: int
    guidance: float
    paths: dict[str, Path]  # mp4, gif, png (and videos/ with `each`); empty where nothing was written
    step: int  # the optimizer step of the weights sampled from
    weights: str  # "ema" or "model"
    wrote: bool = True  # False on ranks 1.. under torchrun: only rank 0 writes
    # wall time of generating and decoding the videos (no loading, no writing of samples.*)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # settings the run was not trained for (Plan.notes)


@dataclass(frozen=True)
class Share:
    """This process's part of a sampling job: group `replica` of `replicas` (each samples batches
    replica, replica + replicas, ...); decodes: the group's first rank (the others only join its model
    calls); writes: rank 0 of the job, which gathers every group's videos. Share(): one process."""

    replica: int = 0
    replicas: int = 1
    decodes: bool = True
    writes: bool = True

    @staticmethod
    def of(world: World, sp: int) -> Share:
        """Groups of `sp` consecutive ranks: the data-parallel replicas training forms
        (eflow.parallel.sequence.data_parallel_world, the (dp, sp) mesh's rows)."""
        from eflow.parallel.sequence import data_parallel_world

        replica = data_parallel_world(world, sp)
        return Share(replica.rank, replica.size, world.rank % sp == 0, world.is_main)


def check_flags(run: LoadedRun, label: int | None, captions: list[str] | None) -> None:
    """--label and --caption against what the run is conditioned on, as errors naming the flags."""
    if run.cfg.data.condition == "text":
        if label is not None:
            raise ConfigError("--label needs a class-conditioned run; this run is conditioned on text")
        return
    if captions:
        raise ConfigError("--caption needs a text-conditioned run (data.condition = text); use --label")
    classes = run.parts.num_classes
    if label is not None and not 0 <= label < classes:
        raise EflowError(f"--label {label} is out of range; this run has classes 0..{classes - 1}")


class _KeepLatents:
    """The autoencoder of a rank that writes nothing: decode() hands the latents back undecoded."""

    def decode(self, latents: Tensor) -> Tensor:
        return latents


def _undecoded(model, autoencoder, *args: Any, **kwargs: Any) -> Tensor:
    """This module's `generate` without the decoding: a rank 1.. of a group only joins the model calls."""
    return generate(model, _KeepLatents(), *args, **kwargs)


def sample_run(
    run: LoadedRun,
    out_dir: Path,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    num: int | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    sampler_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    label: int | None = None,
    captions: list[str] | None = None,
    each: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    share: Share = Share(),
) -> SampleResult:
    """Sample `num` videos from `run` into `out_dir`; None flags take the run's sample section.
    share (under torchrun): this process's batches; a process that does not write makes its model
    calls, hands its group's videos to rank 0 and calls no on_batch."""
    check_flags(run, label, captions)
    pipe = Pipeline(run)
    plan = pipe.plan(
        labels=None if label is None else [label],
        prompts=captions or None,
        num=run.cfg.sample.num if num is None and label is not None else num,  # --label: sample.num videos
        steps=steps,
        guidance=guidance,
        seed=seed,
        sampler=sampler,
        batch_size=batch_size,
        sampler_options=sampler_options,
    )
    n, settings = plan.num, plan.settings
    if n > MAX_GRID and not each:
        raise ConfigError(
            f"--num {n}: the sample grid shows at most {MAX_GRID} videos; add --each to write every video "
            "as its own mp4 (videos/000000.mp4, ...)"
        )
    result = SampleResult(
        n, plan.sampler, settings.steps, settings.guidance, {}, run.step, run.weights, share.writes
    )
    batches = math.ceil(n / plan.batch_size)
    result.notes = [*plan.notes, *idle_groups_note(batches, share.replicas, plan.batch_size)]
    # this module's `generate`, looked up per call, so a caller can watch the batches
    mine = pipe.batches(
        plan,
        generate=generate if share.decodes else _undecoded,
        only=range(share.replica, batches, share.replicas),
    )
    rounds = (gathered(next(mine, None), share) for _ in range(math.ceil(batches / share.replicas)))
    grid: list[torch.Tensor] = []
    set_names = ("samples.mp4", "samples.gif", "samples.png", "videos")  # all a call may write
    with out_of_memory_named(f"sampling {plan.batch_size} videos on {run.device}"):
        if not share.writes:
            for _ in rounds:
                continue  # the model calls are this rank's work; its videos, rank 0's to write
            return result
        try:
            with output_set(out_dir, set_names) as stage:
                started = time.perf_counter()
                for start, videos in (batch for done in rounds for batch in done):
                    if each:
                        for i, video in enumerate(videos, start=start):
                            write_mp4(stage / "videos" / f"{i:06d}.mp4", video, fps=settings.fps)
                    grid.extend(videos[: MAX_GRID - len(grid)])
                    if on_batch is not None:
                        on_batch(len(videos), n)  # videos done in this batch, of n
                result.seconds = time.perf_counter() - started  # the videos are on the host: synchronized
                staged = write_samples(torch.stack(grid), stage, settings.fps)
                if each:
                    staged["videos"] = stage / "videos"
        except OSError as err:
            raise EflowError(f"cannot write to --out {out_dir}: {err.strerror or err}") from None
    result.paths = {kind: out_dir / path.name for kind, path in staged.items()}
    return result


def gathered(batch: tuple[int, Tensor] | None, share: Share) -> list[tuple[int, Tensor]]:
    """One round's batches, in order, on the writing rank: this process's `batch` (start, videos) or
    None, and under torchrun every group's, gathered on rank 0 (the groups' first ranks send their
    decoded videos, the others nothing); [] on the other ranks. The videos travel as the uint8 frames
    the files hold (a quarter of the floats' bytes) and arrive as floats that write the same bytes."""
    if share.replicas == 1:
        return [batch] if batch is not None and share.decodes else []
    sent = None
    if batch is not None and share.decodes:
        sent = (batch[0], torch.from_numpy(to_uint8(batch[1])))  # [b, T, H, W, C]
    received: list[Any] | None = [None] * dist.get_world_size() if share.writes else None
    dist.gather_object(sent, received, dst=0)
    frames = sorted((b for b in received or [] if b is not None), key=lambda b: b[0])
    return [(start, from_uint8(u)) for start, u in frames]


def idle_groups_note(batches: int, replicas: int, batch_size: int) -> list[str]:
    """A note when there are fewer batches than groups of processes to sample them."""
    if batches >= replicas:
        return []
    return [
        f"{batches} batch(es) of up to {batch_size} videos for {replicas} groups of processes: "
        f"{replicas - batches} group(s) sample nothing; a smaller --batch-size spreads the videos"
    ]


@contextmanager
def out_of_memory_named(doing: str) -> Iterator[None]:
    """An out-of-memory error inside as one EflowError saying what ran out and to lower --batch-size."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise EflowError(out_of_memory_message(err, doing, "lower --batch-size")) from None


# ----- sampling under torchrun ------------------------------------------------------------------------
def check_processes(sp: int, processes: int) -> None:
    """Sampling runs processes / sp groups of sp ranks: sp must divide the process count (checked before
    any process joins a group)."""
    if sp < 1:
        raise ConfigError(f"--sp {sp}: must be at least 1")
    if processes % sp == 0:
        return
    raise ConfigError(
        f"--sp {sp} needs a multiple of {sp} processes (groups of {sp} split each model call); this job "
        f"has {processes}: run `torchrun --nproc-per-node {sp} -m eflow.cli.app sample RUN --sp {sp}`, or "
        f"{2 * sp} processes for two groups taking the batches in turn"
    )


def split_over_group(run: LoadedRun, world: World, sp: int) -> None:
    """Ulysses over the `sp` ranks of `world` on the run's model, in place; sp = 1: nothing. The model
    is checked first (sp divides its heads, its backend can be split), alike on every rank."""
    if sp == 1:
        return
    from eflow.parallel.sequence import apply_sequence_parallel, check_model, sequence_mesh

    try:
        check_model(run.parts.model, sp)
    except ConfigError as err:
        raise ConfigError(f"eflow sample --sp {sp}: {err}") from None
    apply_sequence_parallel(run.parts.model, sequence_mesh(world, sp, run.device.type))


@contextmanager
def joined_world(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """The process group torchrun describes, joined (gloo on CPU, NCCL on CUDA with this process's
    LOCAL_RANK device), and destroyed on leaving, also on error; one process: World() and `device`."""
    joins = not dist.is_initialized()  # a group a caller made stays the caller's
    world = init_world(device)
    try:
        if world.size > 1 and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        yield world, device
    finally:
        if joins:
            shutdown(world)


def default_samples_dir(run_dir: Path) -> Path:
    """RUN/samples; for a checkpoint of a run (RUN/checkpoints/step_N) RUN/samples/step_N, so that nothing
    is written into a checkpoint (whose folder retention may delete)."""
    if run_dir.parent.name == CHECKPOINTS and step_of(run_dir) is not None:
        return run_dir.parent.parent / "samples" / run_dir.name
    return run_dir / "samples"


def sample_run_dir(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    weights: str = "ema",
    sp: int = 1,
    **flags: Any,
) -> SampleResult:
    """`eflow sample RUN_DIR`: load the run and sample it into out_dir (default RUN_DIR/samples); flags:
    sample_run's. Under torchrun with P processes (a multiple of sp): every rank joins the job and loads
    the run; groups of sp ranks split their model's tokens (eflow.parallel.sequence, sp > 1) and take
    the batches in turn (Share); the videos are one process's, rank 0 alone writes them, and the
    result of every other rank has wrote=False and no paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_samples_dir(run_dir)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    check_processes(sp, int(os.environ.get("WORLD_SIZE", "1")))
    with joined_world(device) as (world, device):
        run = load_run(run_dir, device, weights)
        split_over_group(run, world, sp)
        return sample_run(run, out_dir, share=Share.of(world, sp), **flags)
