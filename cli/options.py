"""Option helpers shared by the commands: registry-backed help text.

Sizes, flag layers and KEY=VALUE pairs are parsed in the core (eflow.run_config.parse_size and
config_layer, eflow.config.parse_assignments); they are re-exported here for the commands that import
them from this module.
"""

from __future__ import annotations

from typing import Any

from eflow.config import deep_merge, parse_assignments
from eflow.registry import get_registry
from eflow.run_config import config_layer, parse_size

__all__ = ["apply_overrides", "choices", "config_layer", "parse_assignments", "parse_size"]


def choices(kind: str) -> str:
    """'a, b, c' of a registry, for help texts (read after plugins load)."""
    try:
        return ", ".join(get_registry(kind).names())
    except Exception:  # help must render even if a plugin is broken
        return "?"


def apply_overrides(tree: dict[str, Any], pairs: list[str]) -> None:
    """Apply --set section.field=value pairs to a config dict, in place (prefer parse_assignments)."""
    tree.update(deep_merge(tree, parse_assignments(pairs)))
