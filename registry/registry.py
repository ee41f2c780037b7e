"""Name -> factory registries, one per plugin kind."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from eflow.errors import ConfigError, EflowError

KINDS = (
    "attention",
    "objective",
    "token_drop",
    "sampler",
    "dataset",
    "autoencoder",
    "text_encoder",
    "feature_extractor",
)


class UnknownNameError(EflowError, KeyError):
    """A name that no plugin registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicateNameError(EflowError):
    """Two plugins registered the same name in one registry."""


# What a plugin may declare about itself when it registers (register(name, factory, hybrid=True)), per kind,
# with each capability's type and its value when not declared. The core reads these instead of probing
# the plugin's attributes.
CAPABILITIES: dict[str, dict[str, tuple[type, Any]]] = {
    # hybrid: one full softmax block after every K blocks of this backend (the preset's softmax_ratio; GLGA,
    # EFlow 4.1); attend_reads_x: `attend` reads its x argument (a gate), so sequence parallelism gathers
    # the block's tokens for it (eflow.parallel.sequence); False spares that all-gather
    "attention": {"hybrid": (bool, False), "attend_reads_x": (bool, True)},
    # default_sampler: the sampler `eflow sample` uses for runs trained with this objective;
    # same_calls_every_rank: every rank makes the same model calls in every step whatever its batch draws
    # (then FSDP may gather weights per call: parallel.fsdp_reshard_after_forward); trained_sampling: the
    # run's sample section (steps, guidance, sampler options) is part of what it learned (an MLCD student's
    # segments, w and shift), so sampling with other settings gets a note
    "objective": {
        "default_sampler": (str, "euler"),
        "same_calls_every_rank": (bool, False),
        "trained_sampling": (bool, False),
    },
    # whether items carry class labels (False: captions only, so a run on it is text-conditioned)
    "dataset": {"labels": (bool, True)},
}


@dataclass(frozen=True)
class Entry:
    """One registered implementation."""

    kind: str
    name: str
    factory: Callable[..., Any]
    summary: str = ""
    options: type[BaseModel] | None = None  # pydantic model (extra="forbid") of the factory's options
    owner: str = "?"  # the plugin (entry point) that registered it
    version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)  # declared at registration (CAPABILITIES)

    def capability(self, name: str) -> Any:
        """A declared capability, else the factory's attribute of that name (plugins written before
        capabilities existed), else the kind's default."""
        if name in self.capabilities:
            return self.capabilities[name]
        factory = getattr(self.factory, "func", self.factory)  # functools.partial
        _, default = CAPABILITIES[self.kind][name]
        return getattr(factory, name, default)

    def parse_options(self, options: dict[str, Any] | BaseModel | None) -> BaseModel | None:
        """Validate user options against the plugin's pydantic model; errors name the field."""
        if self.options is None:
            if options:
                keys = options if isinstance(options, dict) else options.model_dump()
                raise ConfigError(f"{self.kind} '{self.name}' takes no options, got: {', '.join(keys)}")
            return None
        if isinstance(options, self.options):
            return options
        try:
            return self.options.model_validate(options or {})
        except ValidationError as err:
            raise ConfigError(
                format_validation_error(err, f"{self.kind} '{self.name}' options", self.options)
            ) from None

    def create(self, *args: Any, options: dict[str, Any] | BaseModel | None = None, **kwargs: Any) -> Any:
        """Build the implementation: factory(*args, **validated_options, **kwargs)."""
        parsed = self.parse_options(options)
        opts = parsed.model_dump() if parsed is not None else {}
        return self.factory(*args, **opts, **kwargs)


def format_validation_error(err: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line per pydantic error naming the dotted field; a typo lists the valid fields."""
    lines = [f"invalid {where}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1]) if model is not None else None
            msg = "unknown field" + (f"; valid fields: {', '.join(parent.model_fields)}" if parent else "")
        elif e["type"] == "missing" and model is not None:  # say what the field is (and its flag, if any)
            parent = _model_at(model, e["loc"][:-1])
            field = parent.model_fields.get(str(e["loc"][-1])) if parent else None
            if field is not None and field.description:
                msg = f"required: {field.description}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` through nested model fields."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


class Registry:
    """Implementations of one kind, keyed by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        summary: str = "",
        options: type[BaseModel] | None = None,
        owner: str = "?",
        version: str = "",
        **capabilities: Any,
    ) -> Entry:
        """Add `name` with its declared capabilities (CAPABILITIES of this kind); a second registration of
        the same name fails naming both owners."""
        if not name or name != name.strip():
            raise EflowError(f"{self.kind} plugin from '{owner}' registered an empty or padded name {name!r}")
        if name in self._entries:
            first = self._entries[name].owner
            raise DuplicateNameError(
                f"{self.kind} '{name}' is registered twice: first by plugin '{first}', again by plugin '{owner}'"
            )
        if options is not None and not (isinstance(options, type) and issubclass(options, BaseModel)):
            raise EflowError(f"{self.kind} '{name}' from '{owner}': options must be a pydantic model class")
        known = CAPABILITIES.get(self.kind, {})
        for key, value in capabilities.items():
            if key not in known:
                choices = ", ".join(known) or "none"
                raise EflowError(
                    f"{self.kind} '{name}' from '{owner}' declares an unknown capability {key!r}; "
                    f"{self.kind} plugins may declare: {choices}"
                )
            kind_type = known[key][0]
            if not isinstance(value, kind_type):
                raise EflowError(
                    f"{self.kind} '{name}' from '{owner}': capability {key}={value!r} must be a {kind_type.__name__}"
                )
        entry = Entry(self.kind, name, factory, summary, options, owner, version, dict(capabilities))
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry for `name`; an unknown name fails listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} '{name}'; choices: {known}") from None

    def create(self, name: str, *args: Any, options: dict[str, Any] | BaseModel | None = None, **kwargs: Any):
        """Build the implementation registered as `name`."""
        return self.get(name).create(*args, options=options, **kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
