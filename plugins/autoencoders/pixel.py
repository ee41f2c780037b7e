"""Autoencoder `pixel`: [-1, 1] pixels as latents (train a pixel-space DiT; no weights, no compression),
optionally normalized per channel, z = (x - mean) / std, as the Wan VAE normalizes its latents: the
noise N(0, I) then meets data of unit scale, which sets the signal-to-noise ratio of every time t.

Interface every autoencoder plugin follows:
    encode(video [B, C, T, H, W] in [-1, 1]) -> latents [B, c, t, h, w]
    decode(latents [B, c, t, h, w]) -> video [B, C, T, H, W], clamped to [-1, 1]
    latent_shape(video_shape (C, T, H, W)) -> (c, t, h, w)
    latent_channels (c), temporal_compression (T / t), spatial_compression (H / h = W / w)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from eflow.api import hookimpl


class PixelOptions(BaseModel):
    """Options of the `pixel` autoencoder."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(3, ge=1, description="channels of the videos (3 = RGB); latents have the same")
    normalize: bool = Field(
        False,
        description="a new run fits mean and std per channel on its first clips (recorded in config.json); "
        "false keeps the raw [-1, 1] pixels",
    )
    mean: list[float] | None = Field(None, description="per-channel (or one) mean; unset = 0")
    std: list[float] | None = Field(None, description="per-channel (or one) std; unset = 1")

    @model_validator(mode="after")
    def _stats_match_channels(self) -> PixelOptions:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(
                    f"{name} needs 1 or {self.channels} values (one per channel), got {len(values)}"
                )
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class PixelAutoencoder(nn.Module):
    """Pixels as latents, z = (x - mean) / std per channel (the identity by default); no parameters."""

    temporal_compression = 1
    spatial_compression = 1

    def __init__(
        self,
        channels: int = 3,
        normalize: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        super().__init__()
        opts = PixelOptions(channels=channels, normalize=normalize, mean=mean, std=std)
        self.latent_channels, self.normalize = channels, opts.normalize
        per_channel = [torch.tensor(v or d, dtype=torch.float32).expand(channels).reshape(-1, 1, 1, 1).clone()
                       for v, d in ((opts.mean, [0.0]), (opts.std, [1.0]))]  # fmt: skip
        self.register_buffer("mean", per_channel[0], persistent=False)  # [C, 1, 1, 1]
        self.register_buffer("std", per_channel[1], persistent=False)
        self.fitted = opts.mean is not None or opts.std is not None

    @property
    def needs_statistics(self) -> bool:
        """True when `normalize` is on and no mean and std were given: `fit_statistics` should be called."""
        return self.normalize and not self.fitted

    def fit_statistics(self, clips: list[Tensor]) -> dict[str, list[float]]:
        """Fit mean and std per channel on sample clips [C, T, H, W] in [-1, 1] (their sizes may differ) and
        return them as the options to record."""
        for clip in clips:
            self._check(clip.shape[0], "video")
        x = torch.cat([clip.double().flatten(1) for clip in clips], dim=1)  # [C, pixels of all clips]
        mean, std = x.mean(dim=1), x.std(dim=1).clamp(min=1e-3)
        self.mean.copy_(mean.float().view(-1, 1, 1, 1))
        self.std.copy_(std.float().view(-1, 1, 1, 1))
        self.fitted = True
        return {"mean": [round(v, 6) for v in mean.tolist()], "std": [round(v, 6) for v in std.tolist()]}

    def encode(self, video: Tensor) -> Tensor:
        """[B, C, T, H, W] in [-1, 1] -> latents (x - mean) / std, same shape."""
        self._check(video.shape[1], "video")
        return (video - self.mean.to(video.dtype)) / self.std.to(video.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """[B, C, T, H, W] latents -> pixels z std + mean, clamped to [-1, 1]."""
        self._check(latents.shape[1], "latents")
        return (latents * self.std.to(latents.dtype) + self.mean.to(latents.dtype)).clamp(-1.0, 1.0)

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
        return f"channels={self.latent_channels}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


@hookimpl
def register_autoencoders(register):
    register(
        "pixel",
        PixelAutoencoder,
        summary="[-1, 1] pixels as latents, optionally normalized per channel: pixel-space training, no weights",
        options=PixelOptions,
    )
