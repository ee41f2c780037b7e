"""What the training and sampling ladders (EFlow Fig. 4a / 4b) share: rungs, the base config, the clip, inputs.

A ladder is a list of rungs, each a small frozen dataclass of the settings that change from rung to
rung (attention, objective, sampler, ...); everything else comes from one base RunConfig (defaults ->
`--config run.toml` -> flags -> `--set`), so every rung runs the same preset, clip shape, batch size
and random inputs. A rung is given by name (a built-in rung) or as KEY=VALUE pairs
("name=mine,base=+pdg,drop=0.5"): `base` names the rung it starts from (default: the dataclass's
defaults), the other keys set its fields.

The clip: the base config's data.frames x data.height x data.width pixels through its autoencoder, or a
token grid T'xH'xW' given directly, turned into the pixel clip that the autoencoder and the preset's
patch map onto exactly that grid (frames = (T' pt - 1) tc + 1, height = H' ph sc, width = W' pw sc
with tc, sc the autoencoder's temporal and spatial compression).

Running a ladder (`LadderSpec`, `run_rungs`): every rung's config is checked before anything runs;
then per rung, its record is filled from the parts built on the meta device, Dynamo is reset (each rung
compiles afresh, as its own `eflow train` / `eflow sample` process would), the rung is measured (an
exception becomes its status: "oom", "error: ..."), the device's memory is released and the speed-ups
over the first rung are set.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from eflow.assembly import Parts, build_parts, resolve_device, validate_plugins
from eflow.bench.attention import failure_status, release_memory
from eflow.bench.device_peak import device_name, mfu, peak_tflops
from eflow.bench.grids import format_grid, grid_for_tokens, parse_grid, parse_token_count, split_list
from eflow.bench.timing import Timing
from eflow.condition import Condition
from eflow.config import DROP_FIELDS, RunConfig, build_config, load_toml, parse_assignments, parse_value
from eflow.errors import ConfigError, EflowError
from eflow.model.presets import PRESETS
from eflow.registry import get_registry
from eflow.run_config import config_layer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # autocast dtype (weights stay fp32, as in training)
TEXT_TOKENS = 512  # random text embeddings when the text encoder states no length (Wan 2.1 pads to 512)

LADDER_FLAGS = {  # flag -> RunConfig field of the base config (size -> data.height, data.width)
    "preset": "model.preset",
    "frames": "data.frames",
    "batch_size": "train.batch_size",
    "autoencoder": "data.autoencoder",
    "vae_path": "data.autoencoder_options.path",
    "ac": "parallel.ac",  # bench train only
    "compile_": "parallel.compile",  # bench train only
}

Rung = TypeVar("Rung")
Record = TypeVar("Record")


# ----- rungs ---------------------------------------------------------------------------------------------
def parse_rungs(
    values: list[str] | None, named: Mapping[str, Rung], keys: Mapping[str, str], default: Rung
) -> list[Rung]:
    """Rungs from --rung values: comma-separated names of `named`, or one custom rung as KEY=VALUE pairs.

    `keys` maps a user key (e.g. "attn") to the rung's field ("attention"); `default` is the rung a
    custom one starts from without `base`. No values: every named rung, in order.
    """
    if not values:
        return list(named.values())
    rungs: list[Rung] = []
    for value in values:
        if "=" in value:
            rungs.append(custom_rung(value, named, keys, default, f"custom-{len(rungs) + 1}"))
        else:
            rungs.extend(named_rung(name, named) for name in split_list(value))
    if not rungs:
        raise ConfigError(f"--rung: no rung given; choices: {', '.join(named)}")
    names = [rung.name for rung in rungs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--rung: {', '.join(repeated)} given twice; give each rung once (or rename it)")
    return rungs


def named_rung(name: str, named: Mapping[str, Rung]) -> Rung:
    """The built-in rung `name`; an unknown name lists the choices."""
    if name not in named:
        raise ConfigError(f"--rung: unknown rung '{name}'; choices: {', '.join(named)} (or KEY=VALUE pairs)")
    return named[name]


def custom_rung(
    text: str, named: Mapping[str, Rung], keys: Mapping[str, str], default: Rung, fallback_name: str
) -> Rung:
    """ "name=mine,base=+pdg,drop=0.5" -> a rung (values read as TOML scalars, checked against field types)."""
    pairs: dict[str, str] = {}
    for pair in split_list(text):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--rung {text!r}: expected KEY=VALUE pairs, e.g. name=mine,base=+pdg,drop=0.5")
        if key not in ("name", "base", *keys):
            raise ConfigError(f"--rung {text!r}: unknown key '{key}'; keys: name, base, {', '.join(keys)}")
        pairs[key] = value.strip()
    rung = named_rung(pairs.pop("base"), named) if "base" in pairs else default
    name = pairs.pop("name", fallback_name)
    values = {
        keys[key]: _typed(text, key, parse_value(raw), getattr(rung, keys[key])) for key, raw in pairs.items()
    }
    return dataclasses.replace(rung, name=name, **values)


def _typed(text: str, key: str, value: Any, like: Any) -> Any:
    """`value` checked to be of the kind of the field's current value `like` (None: a plugin name)."""
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif like is None and isinstance(value, int | float) and not isinstance(value, bool):
        ok, value = True, float(value)  # an optional number (None: the base config's)
    else:  # a name (str, or None: the base config's)
        ok, value = True, str(value)
    if not ok:
        kind = "true or false" if isinstance(like, bool) else f"a number like {like!r}"
        raise ConfigError(f"--rung {text!r}: {key}={value!r}: give {kind}")
    return value


def set_plugin(section: dict[str, Any], name_key: str, options_key: str, name: str) -> None:
    """Switch a config section's plugin to `name`; the old plugin's options go (they would not fit), so
    the rung runs `name` with its defaults (ladder_base refuses a base whose options fit no plugin of it)."""
    if section[name_key] != name:
        section[name_key] = name
        section[options_key] = {}


def rung_config(base: RunConfig, rung_name: str, tree: dict[str, Any]) -> RunConfig:
    """Validate a rung's config dict (from base.model_dump) and check its plugins; errors name the rung."""
    cfg = build_config(tree, where=f"config of rung '{rung_name}'")
    try:
        validate_plugins(cfg)
    except EflowError as err:
        raise ConfigError(f"rung '{rung_name}': {err}") from None
    return cfg


# ----- the base config and the clip --------------------------------------------------------------------
def preset_field(cfg: RunConfig, field: str) -> Any:
    """A field of the config's model preset, model.overrides applied; an unknown preset lists the choices."""
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{cfg.model.preset}'; choices: {', '.join(PRESETS)}")
    value = cfg.model.overrides.get(field, getattr(PRESETS[cfg.model.preset], field))
    return tuple(value) if isinstance(value, list) else value


def base_config(layers: list[dict[str, Any]], grid: tuple[int, int, int] | None = None) -> RunConfig:
    """The config every rung starts from: the layers merged, conditioning resolved without a dataset
    (the preset's classes, or text for a text-only preset), no curriculum, and the clip of `grid` if given."""
    cfg = build_config(*layers)
    tree = cfg.model_dump(mode="json")
    data = tree["data"]
    data["image_ratio"] = 0.0
    tree["schedule"]["stages"] = cfg.schedule.view(DROP_FIELDS)  # one clip shape for every step
    classes = preset_field(cfg, "num_classes")
    if data["condition"] == "label" and not classes:
        data["condition"] = "text"  # a text-only preset (1.5B) takes no labels
    if data["condition"] == "label" and data["num_classes"] is None:
        data["num_classes"] = classes
    if grid is not None:
        data["frames"], data["height"], data["width"] = clip_for_grid(cfg, grid)
    return build_config(tree)


def ladder_base(
    config: str | Path | None,
    flags: Mapping[str, Any],
    overrides: list[str],
    grid: str | None = None,
    tokens: str | None = None,
    extra: dict[str, Any] | None = None,
) -> RunConfig:
    """The base config of a ladder: defaults -> run.toml `config` -> `extra` -> `flags` (LADDER_FLAGS and
    size; None: not given) -> `overrides` (--set KEY=VALUE), on the clip of `grid` or `tokens` if given."""
    ways = [flag for flag, value in (("--grid", grid), ("--tokens", tokens)) if value is not None]
    if flags.get("frames") is not None or flags.get("size") is not None:
        ways.append("--frames/--size")
    if len(ways) > 1:
        raise ConfigError(f"give the clip one way: {' or '.join(ways)}, not both")
    clip = parse_grid(grid) if grid else grid_for_tokens(parse_token_count(tokens)) if tokens else None
    layers = [load_toml(config)] if config is not None else []
    layers += [extra or {}, config_layer(flags, LADDER_FLAGS), parse_assignments(overrides)]
    base = base_config(layers, clip)
    try:
        validate_plugins(base)  # else options meant for another plugin would vanish when a rung switches
    except EflowError as err:
        raise ConfigError(
            f"the base config (defaults, --config, --set): {err}. Options given there belong to the base's "
            f"own plugins (model.attention = '{base.model.attention}'), and a rung that switches a plugin "
            "starts from that plugin's defaults; to give a rung's plugin options, make it the base's too, "
            "e.g. --set model.attention=tile --set 'model.attention_options={frame_window=1}'"
        ) from None
    return base


def clip_for_grid(cfg: RunConfig, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, height, width) pixels that the config's autoencoder and patch turn into token grid `grid`."""
    d = cfg.data
    autoencoder = get_registry("autoencoder").create(d.autoencoder, options=d.autoencoder_options)
    tc, sc = autoencoder.temporal_compression, autoencoder.spatial_compression
    pt, ph, pw = preset_field(cfg, "patch")
    t, h, w = grid
    return ((t * pt - 1) * tc + 1, h * ph * sc, w * pw * sc)


def check_parts(cfg: RunConfig) -> Parts:
    """The rung's parts built on the meta device (no memory, no time): this checks that the clip fits the
    autoencoder and the patch (errors name the field) and gives shapes and parameter counts."""
    with torch.device("meta"):
        return build_parts(cfg, with_dataset=False)


def token_grid(parts: Parts) -> tuple[int, int, int]:
    """The model's (T', H', W') token grid of one clip's latents."""
    return parts.model.token_grid((1, *parts.latent_shape))


# ----- the spec and the run of a ladder ----------------------------------------------------------------
class LadderSpec(ABC):
    """What TrainLadderSpec and SampleLadderSpec share (dataclasses with base, rungs, warmup, device,
    dtype, seed and timing fields of their own): the checks, the clip's layout, the recorded parameters."""

    base: RunConfig
    rungs: list[Any]
    warmup: int
    device: str
    dtype: str  # autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32
    seed: int

    @abstractmethod
    def config_of(self, rung: Any) -> RunConfig:
        """The base config with the rung's settings."""

    @abstractmethod
    def limits(self) -> list[tuple[str, int, int]]:
        """(flag, value, least allowed) of the spec's counts."""

    @abstractmethod
    def timing_parameters(self) -> dict[str, Any]:
        """The batch and the counts as recorded in results.json (after the clip, before the device)."""

    def validate(self) -> list[RunConfig]:
        """Every rung's config, checked (names, options, the clip against the patch) before anything runs."""
        if not self.rungs:
            raise ConfigError("--rung: no rung given")
        for flag, value, low in self.limits():
            if value < low:
                raise ConfigError(f"{flag} {value}: must be at least {low}")
        configs = [self.config_of(rung) for rung in self.rungs]
        for cfg in configs:
            check_parts(cfg)
        return configs

    def layout(self) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
        """(token grid, latent shape (c, t, h, w)) of one clip, the same for every rung."""
        parts = check_parts(self.config_of(self.rungs[0]))
        return token_grid(parts), parts.latent_shape

    def parameters(self) -> dict[str, Any]:
        """The ladder's settings as JSON-able values (recorded in results.json)."""
        d = self.base.data
        grid, latent_shape = self.layout()
        return {
            "preset": self.base.model.preset,
            "grid": format_grid(grid),
            "tokens": grid[0] * grid[1] * grid[2],
            "clip": f"{d.frames}x{d.height}x{d.width}",
            "latent_shape": list(latent_shape),
            "autoencoder": d.autoencoder,
            "condition": d.condition,
            **self.timing_parameters(),
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "rungs": [dataclasses.asdict(rung) for rung in self.rungs],
        }

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on `device` (as SweepSpec.torch_dtype: what results.json's environment names)."""
        return autocast_dtype(self.dtype, device)

    def hardware(self) -> tuple[torch.device, torch.dtype, float | None]:
        """(device, autocast dtype, the device's dense peak TF/s at that dtype; None: not known)."""
        device = resolve_device(self.device)
        dtype = self.torch_dtype(device)
        return device, dtype, peak_tflops(device_name(device), dtype)


def rung_fields(
    rung: Any, cfg: RunConfig, meta: Parts, batch: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """The fields every ladder record starts with: rung, attention, preset, grid, tokens, batch, dtype,
    device, params (of the rung's parts built on the meta device)."""
    grid = token_grid(meta)
    return {
        "rung": rung.name,
        "attention": cfg.model.attention,
        "preset": cfg.model.preset,
        "grid": format_grid(grid),
        "tokens": grid[0] * grid[1] * grid[2],
        "batch": batch,
        "dtype": dtype_name(dtype),
        "device": str(device),
        "params": sum(p.numel() for p in meta.model.parameters()),
    }


def run_rungs(
    spec: LadderSpec,
    configs: list[RunConfig],
    device: torch.device,
    new_record: Callable[[Any, RunConfig, Parts], Record],
    measure: Callable[[Any, RunConfig, Record], None],
    finish: Callable[[Record, Record], None],
    on_rung: Callable[[Any], None] | None = None,
) -> Iterator[Record]:
    """Per rung, in order: on_rung(rung), new_record(rung, config, meta parts), a Dynamo reset, measure
    (an exception becomes the record's status and the ladder goes on), the device's memory released,
    finish(record, the first rung's record) (speed-ups); then the record is yielded."""
    first: Record | None = None
    for rung, cfg in zip(spec.rungs, configs, strict=True):
        if on_rung is not None:
            on_rung(rung)
        record = new_record(rung, cfg, check_parts(cfg))
        torch._dynamo.reset()  # each rung compiles afresh, as its own `eflow train` / `eflow sample` would
        try:
            measure(rung, cfg, record)
        except Exception as err:
            record.status = failure_status(err)
        release_memory(device)
        first = record if first is None else first
        finish(record, first)
        yield record


def fill_throughput(record: Any, seconds: float, timing: Timing, peak: float | None) -> None:
    """record.tflops (record.flops over `seconds`), record.mfu against `peak` and record.peak_gb (the CUDA
    peak allocated during the timed calls)."""
    record.tflops = record.flops / seconds / 1e12 if record.flops and seconds > 0 else None
    record.mfu = mfu(record.flops, seconds, peak)
    if timing.peak_bytes is not None:
        record.peak_gb = timing.peak_bytes / 1e9


# ----- inputs, dtype, results -------------------------------------------------------------------------
def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto = bf16 on CUDA (autocast, fp32 weights, as `eflow train` runs), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choices: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def text_length(encoder: Any) -> int:
    """Tokens per caption of a text encoder (its max_tokens / max_length), else TEXT_TOKENS."""
    return int(getattr(encoder, "max_tokens", None) or getattr(encoder, "max_length", None) or TEXT_TOKENS)


def random_condition(parts: Parts, batch: int, generator: torch.Generator) -> Condition:
    """Random class labels [B], or random text embeddings [B, L, Dt] of the configured encoder's width."""
    if parts.num_classes is not None:
        return Condition(labels=torch.randint(parts.num_classes, (batch,), generator=generator))
    encoder = parts.conditioner.text_encoder
    text = torch.randn(batch, text_length(encoder), encoder.dim, generator=generator)
    return Condition(text=text, text_mask=torch.ones(text.shape[:2], dtype=torch.bool))


def condition_tokens(cond: Condition) -> int:
    """Text tokens per sample (0 for class labels)."""
    return 0 if cond.text is None else cond.text.shape[1]


def speedup(value: float | None, first: float | None, higher_is_better: bool = True) -> float | None:
    """value / first (throughput) or first / value (latency); None when either is missing."""
    if not value or not first:
        return None
    return value / first if higher_is_better else first / value
