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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from eflow.assembly import Parts, build_parts, validate_plugins
from eflow.bench.grids import split_list
from eflow.condition import Condition
from eflow.config import RunConfig, build_config, parse_value
from eflow.errors import ConfigError, EflowError
from eflow.model.presets import PRESETS
from eflow.registry import get_registry

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # autocast dtype (weights stay fp32, as in training)
TEXT_TOKENS = 512  # random text embeddings when the text encoder states no length (Wan 2.1 pads to 512)

Rung = TypeVar("Rung")


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
    """Switch a config section's plugin to `name`; the old plugin's options go (they would not fit)."""
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
    data["stages"], data["image_ratio"] = [], 0.0  # one clip shape for every step
    classes = preset_field(cfg, "num_classes")
    if data["condition"] == "label" and not classes:
        data["condition"] = "text"  # a text-only preset (1.5B) takes no labels
    if data["condition"] == "label" and data["num_classes"] is None:
        data["num_classes"] = classes
    if grid is not None:
        data["frames"], data["height"], data["width"] = clip_for_grid(cfg, grid)
    return build_config(tree)


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
