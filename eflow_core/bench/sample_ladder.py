"""`eflow bench sample`: the inference-latency ladder of EFlow Fig. 4b.

Rungs (`SAMPLE_RUNGS`):

    fm-softmax-40x2      Euler, 40 steps with classifier-free guidance (2 NFE per step: 80), softmax
                         attention: the Wan-style flow-matching baseline
    solution-softmax-4   the solution sampler (EFlow Algorithm 2), 4 steps (4 NFE), softmax attention
    solution-glga-4      the same with GLGA (one softmax block every K)
    solution-glga-1      one step (1 NFE), GLGA

Every rung samples with the same preset, clip, batch (default 1) and random inputs (noise, random class
labels or text embeddings) from seeded random weights: latency does not depend on the weights. The
guidance scale is the base config's sample.guidance (4.0) unless the rung sets one; NFE is the
sampler's own count of network evaluations per sample (`last_nfe`).

Measured per rung, under bf16 autocast on CUDA as `eflow sample` runs (eflow.sampling.generate):
- diffusion latency: the sampler from noise to latents, median over `repeats` timed calls after
  `warmup` untimed ones (the first call, compilation included, is reported as first_call_s);
- decode latency: the autoencoder's decode of latents of the clip's shape, timed once for the ladder
  (before any rung, with the same warm-up and repeats; it is the same work for every rung);
- end-to-end = diffusion + decode; speed-ups are over the first rung's latencies.
FLOPs per call = NFE x samples x the forward FLOPs of the full path (eflow.bench.model_flops).

The decode is as costly as the configured autoencoder: `pixel` (the default) decodes in microseconds;
for the paper's setting use `wan` with the Wan 2.1 VAE's folder, or `random_autoencoder("wan")`, which
writes diffusers' default AutoencoderKLWan (the Wan 2.1 architecture) with random weights to a
temporary folder. An out-of-memory error (or any exception) becomes the rung's status and the ladder
goes on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from eflow.assembly import Parts, build_parts
from eflow.bench import ladder
from eflow.bench.attention import failure_status, release_memory
from eflow.bench.model_flops import forward_flops
from eflow.bench.timing import Timing, time_calls
from eflow.config import RunConfig
from eflow.errors import ConfigError, EflowError
from eflow.registry import get_registry
from eflow.sampling import sampler_name

RANDOM_AUTOENCODERS = ("wan",)


@dataclass(frozen=True)
class SampleRung:
    """One rung of the sampling ladder: attention, sampler, steps, guidance; the rest is the base config's."""

    name: str
    attention: str = "glga"  # model.attention
    sampler: str = "solution"  # sample.sampler
    steps: int = 4  # sample.steps
    guidance: float | None = None  # sample.guidance; None: the base config's


SAMPLE_RUNGS: dict[str, SampleRung] = {
    rung.name: rung
    for rung in (
        SampleRung("fm-softmax-40x2", attention="softmax", sampler="euler", steps=40),
        SampleRung("solution-softmax-4", attention="softmax", sampler="solution", steps=4),
        SampleRung("solution-glga-4", attention="glga", sampler="solution", steps=4),
        SampleRung("solution-glga-1", attention="glga", sampler="solution", steps=1),
    )
}
RUNG_KEYS = {"attn": "attention", "sampler": "sampler", "steps": "steps", "guidance": "guidance"}
DEFAULT_RUNG = SampleRung("custom")


def sample_rungs(values: list[str] | None) -> list[SampleRung]:
    """--rung values -> rungs: names of SAMPLE_RUNGS (comma-separated), or one custom rung as KEY=VALUE pairs."""
    return ladder.parse_rungs(values, SAMPLE_RUNGS, RUNG_KEYS, DEFAULT_RUNG)


def sample_rung_config(base: RunConfig, rung: SampleRung) -> RunConfig:
    """The base config with the rung's attention, sampler, steps and guidance."""
    tree = base.model_dump(mode="json")
    ladder.set_plugin(tree["model"], "attention", "attention_options", rung.attention)
    sample = tree["sample"]
    if sampler_name(base) != rung.sampler:
        sample["sampler_options"] = {}
    sample["sampler"], sample["steps"] = rung.sampler, rung.steps
    if rung.guidance is not None:
        sample["guidance"] = rung.guidance
    return ladder.rung_config(base, rung.name, tree)


@contextmanager
def random_autoencoder(name: str) -> Iterator[dict[str, Any]]:
    """Options of a random-weight `name` autoencoder (wan: diffusers' default AutoencoderKLWan, the
    Wan 2.1 architecture, saved in bf16 to a temporary folder), valid inside the block."""
    if name not in RANDOM_AUTOENCODERS:
        raise ConfigError(
            f"--random-vae: autoencoder '{name}' has no random-weight version; use --autoencoder "
            f"{' or '.join(RANDOM_AUTOENCODERS)} (or drop --random-vae)"
        )
    try:
        from diffusers import AutoencoderKLWan
        from diffusers.utils import logging
    except ImportError:
        raise EflowError("--random-vae needs the diffusers package: pip install 'eflow[wan]'") from None
    with tempfile.TemporaryDirectory(prefix="eflow-random-vae-") as folder:
        torch.manual_seed(0)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # casting a fresh model to bf16 is intended: no warning about it
        try:
            AutoencoderKLWan().to(torch.bfloat16).save_pretrained(folder)
        finally:
            logging.set_verbosity(verbosity)
        yield {"path": folder, "subfolder": ""}


@contextmanager
def random_vae_layer(
    random_vae: bool, autoencoder: str | None, vae_path: str | None
) -> Iterator[dict[str, Any] | None]:
    """The base-config layer of --random-vae: data.autoencoder_options of a random-weight `autoencoder`
    (random_autoencoder; valid inside the block), or None without --random-vae."""
    if not random_vae:
        yield None
        return
    if vae_path is not None:
        raise ConfigError("--random-vae and --vae-path contradict each other; pass one")
    with random_autoencoder(autoencoder or "pixel") as options:
        yield {"data": {"autoencoder_options": options}}


@dataclass
class SampleLadderSpec(ladder.LadderSpec):
    """What to run: rungs on top of one base config, and how to time them."""

    base: RunConfig
    rungs: list[SampleRung]
    batch: int = 1  # videos per sampler call
    repeats: int = 3  # timed calls per rung (the median is reported)
    warmup: int = 1  # untimed calls first (compilation happens here)
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32
    seed: int = 0

    def config_of(self, rung: SampleRung) -> RunConfig:
        return sample_rung_config(self.base, rung)

    def limits(self) -> list[tuple[str, int, int]]:
        return [("--batch-size", self.batch, 1), ("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0)]

    def timing_parameters(self) -> dict[str, Any]:
        return {"batch": self.batch, "repeats": self.repeats, "warmup": self.warmup}


@dataclass
class SampleRecord:
    """The result of one rung (one row of results.csv)."""

    rung: str
    attention: str
    sampler: str
    steps: int
    guidance: float
    preset: str
    grid: str  # "T'xH'xW'"
    tokens: int
    batch: int
    dtype: str
    device: str
    autoencoder: str
    params: int | None = None
    status: str = "ok"  # "ok", "oom" or "error: ..."
    nfe: int | None = None  # network evaluations per sample
    diffusion_s: float | None = None  # median sampler latency
    diffusion_min_s: float | None = None
    diffusion_max_s: float | None = None
    first_call_s: float | None = None  # first warm-up call (compilation included)
    decode_s: float | None = None  # median autoencoder decode latency (timed once per ladder)
    e2e_s: float | None = None  # diffusion_s + decode_s
    speedup: float | None = None  # first rung's diffusion_s / this one's
    e2e_speedup: float | None = None  # first rung's e2e_s / this one's
    flops: float | None = None  # model FLOPs of one sampler call (all samples)
    tflops: float | None = None
    mfu: float | None = None
    peak_gb: float | None = None  # CUDA peak allocated during the timed calls
    note: str = ""


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast as eflow.sampling.generate uses it; nothing for fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def time_decode(cfg: RunConfig, spec: SampleLadderSpec, device: torch.device) -> Timing:
    """Timing of the autoencoder's decode (to [-1, 1] pixels) of random latents of the clip's shape."""
    d = cfg.data
    autoencoder = get_registry("autoencoder").create(d.autoencoder, options=d.autoencoder_options)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder.to(device)
    shape = autoencoder.latent_shape((3, d.frames, d.height, d.width))
    generator = torch.Generator().manual_seed(spec.seed)
    latents = torch.randn((spec.batch, *shape), generator=generator).to(device)

    @torch.no_grad()
    def decode() -> None:
        autoencoder.decode(latents.float()).clamp(-1, 1)

    return time_calls(decode, device, max(spec.warmup, 1), spec.repeats)  # the first call loads weights


def measure(
    cfg: RunConfig, spec: SampleLadderSpec, device: torch.device, record: SampleRecord, peak: float | None
) -> None:
    """Build the rung's model (seeded), time its sampler from noise to latents and fill `record`."""
    dtype = spec.torch_dtype(device)
    torch.manual_seed(spec.seed)
    parts = build_parts(cfg, with_dataset=False)
    model = parts.model.to(device).eval()
    sampler = get_registry("sampler").create(cfg.sample.sampler, options=cfg.sample.sampler_options)
    generator = torch.Generator().manual_seed(spec.seed)
    batch = spec.batch
    noise = torch.randn((batch, *parts.latent_shape), generator=generator).to(device)
    cond = ladder.random_condition(parts, batch, generator).to(device)
    s = cfg.sample

    @torch.no_grad()
    def diffusion() -> None:
        renoise = torch.Generator(device=device).manual_seed(spec.seed)
        with autocast(device, dtype):
            sampler.sample(model, noise, cond, s.steps, s.guidance, generator=renoise)

    timing = time_calls(diffusion, device, spec.warmup, spec.repeats)
    record.nfe = sampler.last_nfe
    record.diffusion_s = timing.median_ms / 1e3
    record.diffusion_min_s, record.diffusion_max_s = timing.min_ms / 1e3, timing.max_ms / 1e3
    record.first_call_s = None if timing.first_call_ms is None else timing.first_call_ms / 1e3
    forward = forward_flops(
        model, ladder.token_grid(parts), None, "full", ladder.condition_tokens(cond)
    ).total
    record.flops = None if forward is None else forward * record.nfe * batch
    ladder.fill_throughput(record, record.diffusion_s, timing, peak)


def run_sample_ladder(
    spec: SampleLadderSpec, on_start: Callable[[str], None] | None = None
) -> Iterator[SampleRecord]:
    """Yield one SampleRecord per rung, in order (the decode is timed first); failures become statuses."""
    configs = spec.validate()
    device, dtype, peak = spec.hardware()
    notify = on_start or (lambda what: None)
    notify(f"decode ({spec.base.data.autoencoder})")
    decode_s, decode_status = None, ""
    try:
        decode_s = time_decode(configs[0], spec, device).median_ms / 1e3
    except Exception as err:
        decode_status = failure_status(err)
    release_memory(device)

    def new_record(rung: SampleRung, cfg: RunConfig, meta: Parts) -> SampleRecord:
        return SampleRecord(
            **ladder.rung_fields(rung, cfg, meta, spec.batch, dtype, device),
            sampler=cfg.sample.sampler,
            steps=cfg.sample.steps,
            guidance=cfg.sample.guidance,
            autoencoder=cfg.data.autoencoder,
            decode_s=decode_s,
            note=f"decode: {decode_status}" if decode_status else "",
        )

    def finish(record: SampleRecord, first: SampleRecord) -> None:
        if record.diffusion_s is not None and decode_s is not None:
            record.e2e_s = record.diffusion_s + decode_s
        record.speedup = ladder.speedup(record.diffusion_s, first.diffusion_s, higher_is_better=False)
        record.e2e_speedup = ladder.speedup(record.e2e_s, first.e2e_s, higher_is_better=False)

    def measure_rung(rung: SampleRung, cfg: RunConfig, record: SampleRecord) -> None:
        measure(cfg, spec, device, record, peak)  # the module's measure, looked up at call time

    yield from ladder.run_rungs(
        spec, configs, device, new_record, measure_rung, finish, lambda rung: notify(rung.name)
    )
