"""Fréchet distance between two Gaussians fitted to features, with streaming float64 statistics.

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

The square root of S_1 S_2 is scipy.linalg.sqrtm's (real part; round-off gives it a tiny imaginary
part). When the product is near singular (rank-deficient features, fewer clips than feature
dimensions) sqrtm can return non-finite values; then eps * I is added to both covariances, the
distance is recomputed and `FrechetResult.eps_added` says so. Round-off can push d^2 of two nearly
equal Gaussians a hair below zero; the value is clamped at 0 (`raw` keeps the unclamped number).

`FeatureStats` accumulates, batch by batch, N, the sum of x - c and the sum of outer products
(x - c)(x - c)^T in float64, where the shift c is the first batch's mean (it keeps the
sum-of-squares formula free of cancellation when features have a large offset). Memory is
O(F^2) whatever the number of clips, so 10k clips never sit in memory at once:

    mean = c + s / N,   S = (Q - s s^T / N) / (N - ddof)   with s = sum (x - c), Q = sum (x - c)(x - c)^T

`ddof` = 1 gives the unbiased covariance (N - 1, the default here); `ddof` = 0 the maximum-likelihood
one (N), which StyleGAN-V's FVD uses. Both are recorded with every result (`COVARIANCE_LABELS`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

COVARIANCE_LABELS = {1: "N-1 (unbiased)", 0: "N (maximum likelihood)"}
COVARIANCE_CHOICES = {"n-1": 1, "n": 0}  # the CLI's --cov values -> ddof


class FeatureStats:
    """Streaming float64 mean and covariance of feature vectors [B, F], batch by batch."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be at least 1, got {dim}")
        self.dim = dim
        self.n = 0
        self.shift = np.zeros(dim)  # c: the first batch's mean
        self.total = np.zeros(dim)  # s = sum (x - c)
        self.outer = np.zeros((dim, dim))  # Q = sum (x - c)(x - c)^T

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [B, F] (any float dtype; accumulated in float64)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf; the extractor or the clips are broken")
        if len(x) == 0:
            return
        if self.n == 0:
            self.shift = x.mean(axis=0)
        d = x - self.shift
        self.n += len(x)
        self.total += d.sum(axis=0)
        self.outer += d.T @ d

    def mean(self) -> np.ndarray:
        """mu [F]."""
        self._need(1)
        return self.shift + self.total / self.n

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """S [F, F], normalized by N - ddof (ddof 1: unbiased; 0: maximum likelihood)."""
        self._need(ddof + 1)
        centred = self.outer - np.outer(self.total, self.total) / self.n
        return (centred + centred.T) / (2.0 * (self.n - ddof))  # exactly symmetric

    def _need(self, n: int) -> None:
        if self.n < n:
            raise ValueError(f"need at least {n} feature vectors, have {self.n}")

    def state(self) -> dict[str, np.ndarray]:
        """The accumulators as arrays (for the real-statistics cache)."""
        return {"n": np.asarray(self.n), "shift": self.shift, "total": self.total, "outer": self.outer}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> FeatureStats:
        stats = cls(int(np.asarray(state["shift"]).shape[0]))
        stats.n = int(state["n"])
        stats.shift, stats.total, stats.outer = (
            np.asarray(state[k], dtype=np.float64) for k in ("shift", "total", "outer")
        )
        return stats


@dataclass(frozen=True)
class FrechetResult:
    """d^2 (clamped at 0), the unclamped value, the eps added to both covariances (0 if none) and
    the largest |imaginary part| sqrtm left behind."""

    value: float
    raw: float
    eps_added: float
    imag_max: float


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> FrechetResult:
    """Fréchet distance d^2 between N(mu1, sigma1) and N(mu2, sigma2), all in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    eps_added = 0.0
    with warnings.catch_warnings():  # a singular product is reported by the caller (clips <= dimensions)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            eps_added = eps
            offset = np.eye(len(mu1)) * eps
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    imag_max = float(np.abs(np.imag(root)).max()) if np.iscomplexobj(root) else 0.0
    trace_root = float(np.real(np.trace(root)))
    raw = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return FrechetResult(max(raw, 0.0), raw, eps_added, imag_max)


def frechet_between(a: FeatureStats, b: FeatureStats, ddof: int = 1, eps: float = 1e-6) -> FrechetResult:
    """Fréchet distance between the Gaussians of two accumulated feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    return frechet_distance(a.mean(), a.covariance(ddof), b.mean(), b.covariance(ddof), eps=eps)
