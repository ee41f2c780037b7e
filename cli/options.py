"""Option helpers shared by the commands: sizes, KEY=VALUE overrides, registry-backed help text."""

from __future__ import annotations

from typing import Any

from eflow.config import parse_value, set_dotted
from eflow.errors import ConfigError
from eflow.registry import get_registry


def choices(kind: str) -> str:
    """'a, b, c' of a registry, for help texts (read after plugins load)."""
    try:
        return ", ".join(get_registry(kind).names())
    except Exception:  # help must render even if a plugin is broken
        return "?"


def parse_size(text: str) -> tuple[int, int]:
    """ "32" -> (32, 32); "32x48" -> (height 32, width 48)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--size {text!r}: give pixels as N or HxW, e.g. 32 or 32x48") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size {text!r}: give pixels as N or HxW, e.g. 32 or 32x48")
    return values[0], values[1]


def config_layer(flags: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """The RunConfig layer of explicitly given flags (None = not given): flag -> dotted field by `paths`,
    and `size` ("N" or "HxW") -> data.height, data.width."""
    layer: dict[str, Any] = {}
    for flag, dotted in paths.items():
        if flags.get(flag) is not None:
            set_dotted(layer, dotted, flags[flag])
    if flags.get("size") is not None:
        h, w = parse_size(flags["size"])
        set_dotted(layer, "data.height", h)
        set_dotted(layer, "data.width", w)
    return layer


def apply_overrides(tree: dict[str, Any], pairs: list[str]) -> None:
    """Apply --set section.field=value pairs (any RunConfig field) to a config dict."""
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.ema_decay=0.99")
        key, value = pair.split("=", 1)
        set_dotted(tree, key.strip(), parse_value(value.strip()))
