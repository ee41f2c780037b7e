"""pluggy hook specifications: each hook hands the plugin a `register` callback (or the Typer app)."""

import pluggy

hookspec = pluggy.HookspecMarker("eflow")
hookimpl = pluggy.HookimplMarker("eflow")


@hookspec
def register_attention(register):
    """Register self-attention backends: register(name, factory(dim, num_heads, **options), ...)."""


@hookspec
def register_objectives(register):
    """Register training objectives: register(name, factory(**options) -> Objective, ...)."""


@hookspec
def register_token_drop(register):
    """Register token-drop strategies: register(name, factory(**options) -> TokenDrop, ...)."""


@hookspec
def register_samplers(register):
    """Register samplers: register(name, factory(**options) -> Sampler, ...)."""


@hookspec
def register_datasets(register):
    """Register datasets: register(name, factory(frames, height, width, **options) -> Dataset, ...)."""


@hookspec
def register_autoencoders(register):
    """Register autoencoders (video <-> latents): register(name, factory(**options), ...)."""


@hookspec
def register_text_encoders(register):
    """Register text encoders (captions -> token embeddings): register(name, factory(**options), ...)."""


@hookspec
def register_feature_extractors(register):
    """Register video feature extractors for metrics such as FVD: register(name, factory(**options), ...)."""


@hookspec
def register_commands(app):
    """Add Typer commands or sub-apps to the `eflow` CLI."""
