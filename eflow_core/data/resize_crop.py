"""Short-side resize + centre crop: decoded frames of any size -> a clip of exactly (height, width).

The frames are scaled by s = max(height / H, width / W) (the smallest scale at which both sides cover
the target; antialiased bilinear, so downscaling does not alias), to (max(height, round(H s)),
max(width, round(W s))), and the centre (height, width) window is kept. Resizing runs on uint8 in
channels-last layout (torch's fast path) and the result stays uint8 [3, T, height, width]: the loader
moves clips between processes (and to the GPU) as bytes, a quarter of float32. `to_signed` maps such
a clip to the float32 [-1, 1] range the models use: x / 127.5 - 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resized_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) after the short-side resize that lets a (height, width) centre crop fit."""
    scale = max(height / src_h, width / src_w)
    return max(height, round(src_h * scale)), max(width, round(src_w * scale))


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [3, T, height, width]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W] channels-last
    src_h, src_w = x.shape[-2:]
    h, w = resized_size(src_h, src_w, height, width)
    if (h, w) != (src_h, src_w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).contiguous()


def to_signed(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]; a floating tensor passes through unchanged."""
    if video.dtype != torch.uint8:
        return video
    return video.float() / 127.5 - 1.0
