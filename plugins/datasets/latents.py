"""Dataset `latents`: clips pre-encoded by `eflow data encode`, read back from their safetensors shards.

    eflow data encode --data shapes --frames 17 --size 64 --out latents/shapes
    eflow train --data latents --data-root latents/shapes --frames 17 --size 64

Item k -> {"latents": float32 [c, t, h, w]} (normalized, exactly what the autoencoder's encode gave),
plus "label": int and "caption": str when the encoded dataset had them, and "text": float32 [n, Dt]
with "text_mask": bool [n] when a text encoder ran too (n = the caption's real tokens; the batch
collation pads to the longest). Images of the encoded dataset are items with t = 1, listed in
`image_indices` (the loader batches them apart). The trainer uses "latents" without running the
autoencoder and "text" without running the text encoder; the run's autoencoder still decodes
samples, so it must be the one that encoded (check_run compares them).

The run's frames, height and width must be the ones encoded (the clip shape in index.json); a
mismatch fails at start and names both. Item order is the shards' order; the trainer shuffles.
Skipped (unreadable) items of the original dataset are simply absent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from eflow.api import ConfigError, LatentShards, hookimpl


class LatentsOptions(BaseModel):
    """Options of the `latents` dataset."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(None, description="folder written by `eflow data encode --out` (--data-root)")


def clip_text(frames: int, height: int, width: int) -> str:
    return f"{frames} frames of {height}x{width}"


class LatentsDataset(Dataset):
    """Map-style dataset over a latent folder (see the module docstring)."""

    def __init__(self, frames: int, height: int, width: int, *, seed: int = 0, root: str | None = None):
        if not root:
            raise ConfigError(
                "dataset 'latents' needs the folder that `eflow data encode --out` wrote: --data-root DIR"
            )
        self.root = root
        self.shards = LatentShards(root)
        recipe = self.shards.recipe
        clip = recipe["clip"]
        if (clip["frames"], clip["height"], clip["width"]) != (frames, height, width):
            raise ConfigError(
                f"the latents in {root} hold {clip_text(clip['frames'], clip['height'], clip['width'])}, "
                f"the run asks for {clip_text(frames, height, width)}; "
                f"use --frames {clip['frames']} --size {clip['height']}x{clip['width']}, or encode again"
            )
        self.frames, self.height, self.width = frames, height, width
        self.num_classes: int | None = self.shards.index.get("num_classes")
        self.classes = self.shards.index.get("classes")
        self.image_indices = self.shards.image_indices
        self.autoencoder: dict[str, Any] = recipe["autoencoder"]  # name, options, latent_shape, normalization
        self.text_encoder: dict[str, Any] | None = recipe.get("text_encoder")  # name, options, dim; or None
        self.encoded_from: dict[str, Any] = recipe["dataset"]  # name, options, seed, length, limit
        self.source = str(root)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.shards.item(index)

    def check_run(
        self,
        autoencoder: str,
        latent_shape: tuple[int, ...],
        text_encoder: str | None = None,
        text_dim: int | None = None,
    ) -> None:
        """Fail, naming both sides, if the run's autoencoder (or text encoder) is not the one that encoded."""
        enc = self.autoencoder
        if autoencoder != enc["name"] or tuple(latent_shape) != tuple(enc["latent_shape"]):
            raise ConfigError(
                f"the latents in {self.root} were encoded by autoencoder '{enc['name']}' "
                f"(latent shape {tuple(enc['latent_shape'])}, options {enc['options']}); the run uses "
                f"'{autoencoder}' (latent shape {tuple(latent_shape)}): use --autoencoder {enc['name']} "
                "with the same options, so that samples decode with the autoencoder that encoded"
            )
        stored = self.text_encoder
        if (
            stored is not None
            and text_encoder is not None
            and (text_encoder != stored["name"] or (text_dim is not None and text_dim != stored["dim"]))
        ):
            raise ConfigError(
                f"the text in {self.root} was encoded by text encoder '{stored['name']}' "
                f"({stored['dim']}-d, options {stored['options']}); the run uses '{text_encoder}'"
                + (f" ({text_dim}-d)" if text_dim is not None else "")
                + f": use --text-encoder {stored['name']} with the same options"
            )


@hookimpl
def register_datasets(register):
    register(
        "latents",
        LatentsDataset,
        summary="latent shards written by `eflow data encode` (--data-root DIR): no decoding, no autoencoder pass",
        options=LatentsOptions,
    )
