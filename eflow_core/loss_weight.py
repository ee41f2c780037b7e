"""SoFlow's adaptive loss weight: w = 1 / (e + eps)^p on the per-sample mean squared error, detached."""

from __future__ import annotations

import torch
from torch import Tensor


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """[B] mean over all non-batch elements of (pred - target)^2 (a per-element mean, not a sum), >= float32."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def adaptive_weight(err_per_sample: Tensor, p: float, eps: float) -> Tensor:
    """[B] 1 / (e + eps)^p for the per-sample MSE e [B], with no gradient (loss = mean(w * e))."""
    return (err_per_sample.detach() + eps).pow(-p)
