"""The public surface for plugin authors: `from eflow.registry import hookimpl`."""

from eflow.registry.hookspecs import hookimpl, hookspec
from eflow.registry.manager import PluginInfo, get_registry, host, plugin_infos, reset_host
from eflow.registry.registry import (
    KINDS,
    DuplicateNameError,
    Entry,
    Registry,
    UnknownNameError,
    format_validation_error,
)

__all__ = [
    "KINDS",
    "DuplicateNameError",
    "Entry",
    "PluginInfo",
    "Registry",
    "UnknownNameError",
    "format_validation_error",
    "get_registry",
    "hookimpl",
    "hookspec",
    "host",
    "plugin_infos",
    "reset_host",
]
