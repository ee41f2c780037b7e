"""Token-drop strategies for the middle stack: none, random, sprint (structured group-wise)."""

from eflow.api import hookimpl
from eflow.plugins.token_drop.none import NoDrop
from eflow.plugins.token_drop.random import RandomDrop
from eflow.plugins.token_drop.sprint import SprintDrop, SprintOptions

__all__ = ["NoDrop", "RandomDrop", "SprintDrop", "SprintOptions", "register_token_drop"]


@hookimpl
def register_token_drop(register):
    register("none", NoDrop, summary="Keep every token (ignores the ratio).")
    register("random", RandomDrop, summary="Drop floor(ratio * N) tokens uniformly at random per sample.")
    register(
        "sprint",
        SprintDrop,
        summary="SPRINT structured group-wise drop: keep k random tokens in every (t, h, w) group.",
        options=SprintOptions,
    )
