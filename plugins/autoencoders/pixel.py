"""Autoencoder `pixel`: the identity on [-1, 1] pixels (train a pixel-space DiT; no weights, no compression).

Interface every autoencoder plugin follows:
    encode(video [B, C, T, H, W] in [-1, 1]) -> latents [B, c, t, h, w]
    decode(latents [B, c, t, h, w]) -> video [B, C, T, H, W], clamped to [-1, 1]
    latent_shape(video_shape (C, T, H, W)) -> (c, t, h, w)
    latent_channels (c), temporal_compression (T / t), spatial_compression (H / h = W / w)
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.registry import hookimpl


class PixelOptions(BaseModel):
    """Options of the `pixel` autoencoder."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(3, ge=1, description="channels of the videos (3 = RGB); latents have the same")


class PixelAutoencoder(nn.Module):
    """Identity autoencoder: latents are the pixels; no parameters."""

    temporal_compression = 1
    spatial_compression = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, video: Tensor) -> Tensor:
        """[B, C, T, H, W] -> the same tensor."""
        self._check(video.shape[1], "video")
        return video

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, T, H, W] -> the same, clamped to [-1, 1]."""
        self._check(latents.shape[1], "latents")
        return latents.clamp(-1.0, 1.0)

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(C, T, H, W) -> (C, T, H, W)."""
        c, t, h, w = video_shape
        self._check(c, "video")
        return (c, t, h, w)

    def forward(self, video: Tensor) -> Tensor:
        """Round trip decode(encode(video))."""
        return self.decode(self.encode(video))

    def _check(self, channels: int, what: str) -> None:
        if channels != self.latent_channels:
            raise ValueError(f"pixel autoencoder has {self.latent_channels} channels, {what} has {channels}")

    def extra_repr(self) -> str:
        return f"channels={self.latent_channels}"


@hookimpl
def register_autoencoders(register):
    register(
        "pixel",
        PixelAutoencoder,
        summary="identity on [-1, 1] pixels: pixel-space training, no weights, no compression",
        options=PixelOptions,
    )
