"""Autoencoder `wan`: the Wan 2.1 video VAE (diffusers AutoencoderKLWan) from a local folder, offline.

    latents = (mu(video) - mean) / std          decode: video = D(latents * std + mean), clamped to [-1, 1]

mu is the mean of the VAE posterior (deterministic, so cached latents are reproducible); mean and std
are the per-channel vectors latents_mean / latents_std of the VAE's config.json, so the DiT sees
roughly unit-variance latents. Wan 2.1: 16 channels, 4x temporal and 8x spatial compression, the
first frame encoded alone (causal): T = 4k + 1 frames give 1 + k latent frames; H and W must be
multiples of 8. Other frame counts are refused (the VAE would silently drop the remainder).

Memory: the VAE runs in time chunks (one latent frame at a time, with a causal feature cache), and
`slicing` (on) runs a batch one clip at a time, so memory does not grow with frames or batch. On an
H100 in bfloat16 an 81-frame 480x832 clip decodes with a 4.6 GiB peak (3.1 s) and encodes with 3.6
GiB (1.3 s). `tiling` (off) also splits frames larger than `tile_size` pixels into overlapping tiles
(stride `tile_stride`, blended seams): peaks fall to 1.2 / 1.0 GiB at 2-3x the time and slightly
different pixels; use it for larger frames or small GPUs. Both are diffusers' own mechanisms
(enable_tiling, enable_slicing).

Nothing is downloaded: from_pretrained(local_files_only=True) with HF_HUB_OFFLINE=1. `path` is the
VAE's folder (config.json + diffusion_pytorch_model.safetensors) or a diffusers Wan repository with a
vae/ subfolder (`subfolder` overrides the detection). The weights load on first use, onto the input's
device, in `dtype` (auto: bfloat16 on CUDA, float32 on CPU). Needs `pip install 'eflow[wan]'`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.api import ConfigError, EflowError, hookimpl

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class WanOptions(BaseModel):
    """Options of the `wan` autoencoder."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="local folder of the VAE, or of a Wan repository with vae/")
    subfolder: str | None = Field(
        None, description="folder of the VAE inside path ('' = path itself; auto: '' or 'vae')"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype: auto = bfloat16 on CUDA, float32 on CPU"
    )
    tiling: bool = Field(
        False, description="encode/decode frames larger than tile_size in overlapping tiles (less memory)"
    )
    tile_size: int = Field(256, ge=16, description="tile height and width in pixels")
    tile_stride: int = Field(192, ge=8, description="distance between tiles in pixels (< tile_size: overlap)")
    slicing: bool = Field(True, description="run a batch through the VAE one clip at a time")


def nearest_valid(value: int, step: int, offset: int) -> str:
    """'29 or 33' for value 31, step 4, offset 1: the nearest counts of the form step * k + offset."""
    below = (value - offset) // step * step + offset
    options = [v for v in (below, below + step) if v >= max(offset, 1) and v != value]
    return " or ".join(str(v) for v in options)


def find_vae_folder(path: str | None, subfolder: str | None) -> Path:
    """The folder with the VAE's config.json and weights (see WanOptions)."""
    if not path:
        raise ConfigError(
            "autoencoder 'wan' needs the folder of the Wan VAE: --vae-path DIR "
            "(or --set data.autoencoder_options.path=DIR); nothing is downloaded"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"wan: path {root} is not a folder")
    candidates = [root / subfolder] if subfolder is not None else [root, root / "vae"]
    for folder in candidates:
        if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHTS):
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"wan: no config.json with {WEIGHTS[0]} in {where}")


class WanAutoencoder(nn.Module):
    """Wan VAE with per-channel latent normalization; encode [B, 3, T, H, W] -> [B, 16, 1 + (T-1)//4, H/8, W/8]."""

    def __init__(
        self,
        path: str | None = None,
        subfolder: str | None = None,
        dtype: str = "auto",
        tiling: bool = False,
        tile_size: int = 256,
        tile_stride: int = 192,
        slicing: bool = True,
    ):
        super().__init__()
        if importlib.util.find_spec("diffusers") is None:
            raise EflowError("autoencoder 'wan' needs the diffusers package: pip install 'eflow[wan]'")
        if tile_stride > tile_size:
            raise ConfigError(f"wan: tile_stride ({tile_stride}) must not exceed tile_size ({tile_size})")
        self.folder = find_vae_folder(path, subfolder)
        config = json.loads((self.folder / "config.json").read_text())
        self.latent_channels = int(config.get("z_dim", 16))
        self.temporal_compression = int(config.get("scale_factor_temporal") or 4)
        self.spatial_compression = int(config.get("scale_factor_spatial") or 8)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if (
            mean is None
            or std is None
            or len(mean) != self.latent_channels
            or len(std) != self.latent_channels
        ):
            raise ConfigError(
                f"wan: {self.folder / 'config.json'} needs latents_mean and latents_std with "
                f"{self.latent_channels} values each (the per-channel latent normalization)"
            )
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer(
            "latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False
        )
        self.register_buffer(
            "latents_std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False
        )
        self.dtype_name = dtype
        self.tiling, self.tile_size, self.tile_stride, self.slicing = tiling, tile_size, tile_stride, slicing
        self.vae: nn.Module | None = None  # loaded on first use

    # ----- shapes -------------------------------------------------------------------------------
    def check_frames(self, frames: int) -> None:
        """Refuse a frame count that is not 4k + 1, naming the nearest valid ones."""
        tc = self.temporal_compression
        if frames < 1 or frames % tc != 1 % tc:
            raise ConfigError(
                f"frames={frames} is not {tc}k+1 (the Wan VAE encodes the first frame alone, then groups "
                f"of {tc}); use {nearest_valid(frames, tc, 1)}"
            )

    def check_size(self, height: int, width: int) -> None:
        sc = self.spatial_compression
        for name, value in (("height", height), ("width", width)):
            if value < sc or value % sc:
                raise ConfigError(
                    f"{name}={value} is not a multiple of {sc} (the Wan VAE's spatial compression); "
                    f"use {nearest_valid(value, sc, 0) or sc}"
                )

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(3, T, H, W) -> (16, 1 + (T - 1) // 4, H // 8, W // 8); refuses invalid T, H, W."""
        c, t, h, w = video_shape
        if c != 3:
            raise ValueError(f"the Wan VAE takes RGB videos (3 channels), got {c}")
        self.check_frames(t)
        self.check_size(h, w)
        tc, sc = self.temporal_compression, self.spatial_compression
        return (self.latent_channels, 1 + (t - 1) // tc, h // sc, w // sc)

    # ----- the VAE ------------------------------------------------------------------------------
    def _vae_on(self, device: torch.device) -> nn.Module:
        """The diffusers VAE on `device` (loaded on first call)."""
        if self.vae is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from diffusers import AutoencoderKLWan

            dtype = (
                (torch.bfloat16 if device.type == "cuda" else torch.float32)
                if self.dtype_name == "auto"
                else getattr(torch, self.dtype_name)
            )
            try:
                vae = AutoencoderKLWan.from_pretrained(
                    str(self.folder), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
                )
            except (OSError, ValueError) as err:
                raise EflowError(f"wan: cannot load the VAE from {self.folder}: {err}") from None
            if self.tiling:
                vae.enable_tiling(
                    tile_sample_min_height=self.tile_size,
                    tile_sample_min_width=self.tile_size,
                    tile_sample_stride_height=self.tile_stride,
                    tile_sample_stride_width=self.tile_stride,
                )
            if self.slicing:
                vae.enable_slicing()
            self.vae = vae.eval().requires_grad_(False)
        if self.latents_mean.device != device:
            self.to(device)
        return self.vae.to(device)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> normalized latents float32 [B, 16, 1 + (T-1)//4, H/8, W/8]."""
        if video.ndim != 5:
            raise ValueError(f"encode takes [B, 3, T, H, W] videos, got shape {tuple(video.shape)}")
        self.latent_shape(tuple(video.shape[1:]))
        vae = self._vae_on(video.device)
        mu = vae.encode(video.to(self.vae_dtype)).latent_dist.mode().float()
        return (mu - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalized latents [B, 16, t, h, w] -> video float32 [B, 3, 1 + 4(t-1), 8h, 8w] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode takes [B, {self.latent_channels}, t, h, w] latents, got shape {tuple(latents.shape)}"
            )
        vae = self._vae_on(latents.device)
        z = latents.float() * self.latents_std + self.latents_mean
        return vae.decode(z.to(self.vae_dtype)).sample.float().clamp(-1.0, 1.0)

    def forward(self, video: Tensor) -> Tensor:
        """Round trip decode(encode(video))."""
        return self.decode(self.encode(video))

    def train(self, mode: bool = True) -> WanAutoencoder:
        """The VAE is frozen: it stays in eval mode whatever the caller asks."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def normalization(self) -> dict[str, list[float]]:
        """The per-channel mean and std applied to the latents (recorded in latent caches)."""
        return {"mean": self.latents_mean.flatten().tolist(), "std": self.latents_std.flatten().tolist()}

    def extra_repr(self) -> str:
        return (
            f"{self.folder}, channels={self.latent_channels}, compression={self.temporal_compression}x"
            f"{self.spatial_compression}x{self.spatial_compression}, dtype={self.dtype_name}, tiling={self.tiling}"
        )


@hookimpl
def register_autoencoders(register):
    register(
        "wan",
        WanAutoencoder,
        summary="Wan 2.1 VAE from a local folder (--vae-path), 16 ch, 4x8x8, normalized; pip install 'eflow[wan]'",
        options=WanOptions,
    )
