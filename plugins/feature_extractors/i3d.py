"""Feature extractor `i3d`: a TorchScript I3D (Kinetics-400) loaded from a local file, StyleGAN-V's FVD protocol.

The standard FVD network is StyleGAN-V's `i3d_torchscript.pt`. eflow never downloads it: fetch the
file on a machine with internet access and pass its path (`--i3d-path`, option `path`, or
$EFLOW_I3D_PATH).

Protocol: the first `frames` (16) frames of each clip, as uint8 [B, 3, T, H, W] in 0..255, go to the
model, which rescales them to [-1, 1] and resizes them to 224x224 itself:

    model(videos, rescale=True, resize=True, return_features=True)   -> logits before softmax [B, 400]

Clips with fewer than `frames` frames are refused (no padding or repetition, which would change the
statistics). `call` = "auto" tries that call on a probe clip at load time and falls back to "plain":
eflow maps the clip to [-1, 1] (x / 127.5 - 1), resizes each frame to 224x224 (trilinear, frame count
unchanged) and calls model(x). The convention used is recorded in the protocol, with the file's
SHA-256 as content hash. Features are whatever the call returns, flattened to [B, F].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from eflow.api import EflowError, file_sha256, hookimpl, to_unit_range

PATH_ENV = "EFLOW_I3D_PATH"
RESOLUTION = 224
CALLS = {
    "stylegan-v": "model(uint8 clips, rescale=True, resize=True, return_features=True)",
    "plain": f"model(clips in [-1, 1] resized to {RESOLUTION}x{RESOLUTION} by eflow, trilinear)",
}


class I3DOptions(BaseModel):
    """Options of the `i3d` extractor."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description=f"TorchScript I3D file (StyleGAN-V's i3d_torchscript.pt); default ${PATH_ENV}"
    )
    frames: int = Field(
        16, ge=1, description="frames fed to I3D: the first `frames` of each clip (16 = standard)"
    )
    call: Literal["auto", "stylegan-v", "plain"] = Field(
        "auto", description="how the model is called: StyleGAN-V's keyword call, a plain model(x), or auto"
    )


def missing_file_message(path: str | None) -> str:
    where = f"{path} does not exist" if path else f"no I3D file given (--i3d-path or ${PATH_ENV})"
    return (
        f"the i3d extractor needs a local TorchScript I3D file: {where}. eflow downloads nothing; copy "
        "StyleGAN-V's i3d_torchscript.pt (Kinetics-400 I3D) onto this machine and pass --i3d-path PATH, "
        "or use --extractor indomain"
    )


class I3DExtractor:
    """uint8 clips [B, 3, T, H, W] -> I3D logits [B, F] (F = 400 for Kinetics-400)."""

    name = "i3d"
    metric_label = "FVD (I3D)"

    def __init__(self, path: str | None = None, frames: int = 16, call: str = "auto"):
        path = path or os.environ.get(PATH_ENV) or None
        if not path or not Path(path).expanduser().is_file():
            raise EflowError(missing_file_message(path))
        self.path = Path(path).expanduser()
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the file format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as err:  # torch raises RuntimeError/ValueError subclasses for bad files
            raise EflowError(f"{self.path} is not a loadable TorchScript file: {err}") from None
        self.frames = frames
        self.device = torch.device("cpu")
        self.content_hash = file_sha256(self.path)
        self.call, self.dim = self._probe(call)
        self.protocol = {
            "resolution": f"{RESOLUTION}x{RESOLUTION} (resized by the model)"
            if self.call == "stylegan-v"
            else f"{RESOLUTION}x{RESOLUTION} (trilinear resize by eflow)",
            "frames": frames,
            "input": "uint8 [B, 3, T, H, W] in 0..255 (the first `frames` frames of each clip)",
            "features": "the model's output with return_features=True: logits before softmax",
            "call": CALLS[self.call],
        }

    def _probe(self, call: str) -> tuple[str, int]:
        """Find the call convention (auto) and the feature size on one mid-grey clip."""
        clip = torch.full((1, 3, self.frames, 16, 16), 128, dtype=torch.uint8)
        errors = []
        for convention in ("stylegan-v", "plain") if call == "auto" else (call,):
            try:
                with torch.no_grad():
                    out = self._call(convention, clip)
                return convention, int(out.shape[1])
            except Exception as err:  # a TorchScript signature mismatch is a RuntimeError
                errors.append(
                    f"{convention}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
                )
        raise EflowError(
            f"{self.path}: the model could not be called on a {self.frames}-frame clip ({'; '.join(errors)})"
        )

    def _call(self, convention: str, videos: Tensor) -> Tensor:
        if convention == "stylegan-v":
            out = self.model(videos, rescale=True, resize=True, return_features=True)
        else:
            x = to_unit_range(videos)
            x = F.interpolate(
                x, size=(x.shape[2], RESOLUTION, RESOLUTION), mode="trilinear", align_corners=False
            )
            out = self.model(x)
        return out.reshape(out.shape[0], -1).float()

    def to(self, device: torch.device | str) -> I3DExtractor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def check_clip_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse clips shorter than `frames` or without 3 channels."""
        c, t = shape[0], shape[1]
        if c != 3:
            raise EflowError(f"i3d takes RGB clips (3 channels), got {c}")
        if t < self.frames:
            raise EflowError(
                f"i3d uses {self.frames} frames per clip but the clips have {t}; train and evaluate with "
                f"--frames {self.frames} or more (a non-standard --extractor-option frames={t} is possible, "
                "but its numbers are not comparable with published FVD)"
            )

    @torch.no_grad()
    def features(self, videos: Tensor) -> Tensor:
        """uint8 [B, 3, T, H, W] -> float [B, dim] (the first `frames` frames are used)."""
        self.check_clip_shape(tuple(videos.shape[1:]))
        return self._call(self.call, videos[:, :, : self.frames].to(self.device))


@hookimpl
def register_feature_extractors(register):
    register(
        "i3d",
        I3DExtractor,
        summary="standard FVD features: a TorchScript I3D (Kinetics-400) from a local file, StyleGAN-V protocol",
        options=I3DOptions,
    )
