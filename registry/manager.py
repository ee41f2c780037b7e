"""The plugin manager: loads entry-point plugins (built-ins included) and fills the registries."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from eflow.registry import hookspecs
from eflow.registry.registry import KINDS, DuplicateNameError, Registry

ENTRY_POINT_GROUP = "eflow"
OWN_DISTRIBUTION = "eflow"
DISABLE_AUTOLOAD_ENV = "EFLOW_DISABLE_PLUGIN_AUTOLOAD"  # "1": load no entry points, only DEFAULT_PLUGINS
ALLOW_LIST_ENV = "EFLOW_PLUGINS"  # "a,b": load only these third-party entry points
TRACE_ENV = "EFLOW_TRACE_HOOKS"  # "1": print every hook call

# Used when entry points are off (or eflow runs from an uninstalled checkout); same names as pyproject.toml.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("softmax", "eflow.plugins.attention.softmax"),
    ("glga", "eflow.plugins.attention.glga"),
    ("token-drop", "eflow.plugins.token_drop"),
    ("fm", "eflow.plugins.objectives.fm"),
    ("solution-flow", "eflow.plugins.objectives.solution_flow"),
    ("euler", "eflow.plugins.samplers.euler"),
    ("solution", "eflow.plugins.samplers.solution"),
    ("shapes", "eflow.plugins.datasets.shapes"),
    ("pixel", "eflow.plugins.autoencoders.pixel"),
    ("hashed-words", "eflow.plugins.text_encoders.hashed_words"),
    ("hashed", "eflow.plugins.text_encoders.hashed"),
    ("sana", "eflow.plugins.attention.sana"),
    ("sla", "eflow.plugins.attention.sla"),
    ("vsa", "eflow.plugins.attention.vsa"),
    ("tile", "eflow.plugins.attention.tile"),
    ("video-folder", "eflow.plugins.datasets.video_folder"),
    ("captions", "eflow.plugins.datasets.captions"),
    ("latents", "eflow.plugins.datasets.latents"),
    ("wan", "eflow.plugins.autoencoders.wan"),
    ("minilm", "eflow.plugins.text_encoders.minilm"),
    ("t5", "eflow.plugins.text_encoders.t5"),
    ("i3d", "eflow.plugins.feature_extractors.i3d"),
    ("indomain", "eflow.plugins.feature_extractors.indomain"),
    ("mlcd", "eflow.plugins.objectives.mlcd"),
    ("segment", "eflow.plugins.samplers.segment"),
)

HOOK_OF_KIND = {
    "attention": "register_attention",
    "objective": "register_objectives",
    "token_drop": "register_token_drop",
    "sampler": "register_samplers",
    "dataset": "register_datasets",
    "autoencoder": "register_autoencoders",
    "text_encoder": "register_text_encoders",
    "feature_extractor": "register_feature_extractors",
}


@dataclass
class PluginInfo:
    """What `eflow plugins` shows about one plugin."""

    name: str
    module: str
    version: str = ""
    source: str = "entry point"  # "entry point", "built-in" or "in-process"
    status: str = "loaded"  # "loaded" or "failed"
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # registrations refused (a name already taken)


class PluginHost:
    """One pluggy manager plus the registries it fills (rebuilt whenever the plugin set changes)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("eflow")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] | None = None
        self._loaded = False
        self._trace = os.environ.get(TRACE_ENV) == "1"
        if self._trace:
            self.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            self.pm.enable_tracing()

    # ----- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load built-ins and third-party plugins once (entry-point group "eflow")."""
        if self._loaded:
            return
        self._loaded = True
        autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        allow = os.environ.get(ALLOW_LIST_ENV)
        allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
        own_found = False
        if autoload:
            seen: set[tuple[str, str]] = set()
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                if (ep.name, ep.value) in seen:
                    continue
                seen.add((ep.name, ep.value))
                dist = getattr(ep, "dist", None)
                dist_name = (dist.metadata["Name"] if dist is not None else "") or ""
                own = dist_name.lower() == OWN_DISTRIBUTION
                own_found |= own
                if not own and allowed is not None and ep.name not in allowed:
                    continue
                version = dist.version if dist is not None else ""
                self._load_module(
                    ep.name, ep.value, version, "entry point" if not own else "built-in (entry point)"
                )
        if not own_found:
            from eflow import __version__

            for name, module in DEFAULT_PLUGINS:
                self._load_module(name, module, __version__, "built-in")
        self._registries = None

    def _load_module(self, name: str, module_name: str, version: str, source: str) -> None:
        if name in self.infos:
            warnings.warn(
                f"two eflow plugins are named '{name}' ({self.infos[name].module} and {module_name}); "
                f"keeping the first",
                stacklevel=2,
            )
            return
        try:
            module = importlib.import_module(module_name)
            self._add(module, name, version, source, module_name)
        except Exception as err:  # a broken plugin must not take the others down
            message = f"{type(err).__name__}: {err}"
            warnings.warn(f"eflow plugin '{name}' ({module_name}) failed to load: {message}", stacklevel=2)
            self.infos[name] = PluginInfo(name, module_name, version, source, "failed", message)

    def _add(self, plugin: Any, name: str, version: str, source: str, module_name: str) -> None:
        if self.pm.get_plugin(name) is not None:
            raise ValueError(f"a plugin named '{name}' is already registered")
        self.pm.register(plugin, name=name)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self.infos[name] = PluginInfo(name, module_name, version, source, "loaded", hooks=hooks)
        self._registries = None

    def register(self, plugin: Any, name: str | None = None, version: str = "") -> str:
        """Register a plugin object or module in-process (tests, notebooks); returns its name."""
        self.load()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        module_name = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        self._add(plugin, name, version, "in-process", module_name)
        return name

    def unregister(self, name: str) -> None:
        """Remove a plugin registered in-process."""
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._registries = None

    # ----- registries ----------------------------------------------------------------------------
    def registries(self) -> dict[str, Registry]:
        """All registries, filled by calling every plugin's register_* hooks (each under its owner's name)."""
        self.load()
        if self._registries is None:
            built = {kind: Registry(kind) for kind in KINDS}
            for kind, hook_name in HOOK_OF_KIND.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    owner = impl.plugin_name
                    info = self.infos.get(owner)
                    if info is not None and info.status == "failed":
                        continue
                    register = partial(
                        self._register_once, built[kind], owner=owner, version=info.version if info else ""
                    )
                    if self._trace:
                        print(f"eflow hook: {hook_name} of plugin '{owner}'", file=sys.stderr)
                    try:
                        impl.function(register=register)
                    except Exception as err:  # a plugin whose hook breaks is reported, the rest keep working
                        self._mark_failed(owner, f"{hook_name} raised {type(err).__name__}: {err}")
            self._registries = built
        return self._registries

    def _register_once(self, registry: Registry, name: str, factory: Any, **kwargs: Any) -> Any:
        """registry.register, except that a name already taken keeps its first owner: the duplicate alone
        is skipped with a warning naming both plugins; the plugin's other names still register."""
        try:
            return registry.register(name, factory, **kwargs)
        except DuplicateNameError as err:
            message = f"{err}; keeping the first, skipping the second"
            warnings.warn(f"eflow: {message}", stacklevel=3)
            info = self.infos.get(kwargs.get("owner", ""))
            if info is not None:
                info.skipped.append(
                    f"{registry.kind} '{name}' (already registered by '{registry.get(name).owner}')"
                )
            return None

    def _mark_failed(self, name: str, message: str) -> None:
        warnings.warn(f"eflow plugin '{name}' failed: {message}", stacklevel=3)
        info = self.infos.get(name)
        if info is not None:
            info.status, info.error = "failed", message

    def call_register_commands(self, app: Any) -> None:
        """Let plugins add CLI commands; a plugin whose hook raises is reported, the CLI still works."""
        self.load()
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(app=app)
            except Exception as err:
                self._mark_failed(impl.plugin_name, f"register_commands raised {type(err).__name__}: {err}")


_HOST: PluginHost | None = None


def host() -> PluginHost:
    """The process-wide plugin host (created and loaded on first use)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    _HOST.load()
    return _HOST


def reset_host() -> None:
    """Forget loaded plugins (tests: re-read environment variables and entry points)."""
    global _HOST
    _HOST = None


def get_registry(kind: str) -> Registry:
    """The registry of one kind ("attention", "objective", ...)."""
    regs = host().registries()
    if kind not in regs:
        raise KeyError(f"unknown registry kind '{kind}'; choices: {', '.join(KINDS)}")
    return regs[kind]


def plugin_infos() -> list[PluginInfo]:
    return sorted(host().infos.values(), key=lambda i: i.name)
