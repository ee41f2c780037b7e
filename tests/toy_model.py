"""A tiny model with the eflow model signature, for objective and sampler tests.

model(x [B, 2, 1, 1, 1], t [B], s [B], cond, guidance [B] | None, path="full" | "weak", keep=None) -> F
An MLP on 2-D points: encoder -> middle stack (skipped by path="weak", like PDG's weak path) -> decoder,
with a long skip from the encoder to the decoder. Embeds t, t - s, guidance and the label (NULL_LABEL gets
its own embedding). `middle_calls` counts middle-block calls; with record=True every call is logged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from eflow.condition import NULL_LABEL, Condition


def fourier(v: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim] sinusoidal features over a few octaves."""
    freqs = torch.exp(torch.linspace(0, math.log(64.0), dim // 2, dtype=v.dtype, device=v.device))
    angles = v[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ToyModel(nn.Module):
    """MLP velocity/solution network on 2-D points shaped [B, 2, 1, 1, 1]."""

    def __init__(
        self, num_classes: int = 4, hidden: int = 128, depth: int = 2, emb: int = 32, record: bool = False
    ):
        super().__init__()
        self.emb_dim = emb
        self.label = nn.Embedding(num_classes + 1, hidden)  # index num_classes = null
        self.num_classes = num_classes
        self.cond = nn.Sequential(nn.Linear(3 * emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.encoder = nn.Sequential(nn.Linear(2 + hidden, hidden), nn.SiLU())
        self.middle = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU()) for _ in range(depth)
        )
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.decoder = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.middle_calls = 0
        self.record = record
        self.calls: list[dict] = []

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, guidance=None, path="full", keep=None
    ):
        b = x.shape[0]
        g = torch.zeros_like(t) if guidance is None else guidance
        if self.record:
            self.calls.append(
                {
                    "labels": cond.labels.clone(),
                    "guidance": None if guidance is None else guidance.clone(),
                    "path": path,
                    "grad": torch.is_grad_enabled(),
                    "t": t.clone(),
                    "s": s.clone(),
                    "n": b,
                }
            )
        labels = torch.where(cond.labels == NULL_LABEL, self.num_classes, cond.labels)
        e = torch.cat(
            [fourier(t, self.emb_dim), fourier(t - s, self.emb_dim), fourier(g / 8, self.emb_dim)], 1
        )
        c = self.cond(e.to(x.dtype)) + self.label(labels)
        h0 = self.encoder(torch.cat([x.reshape(b, 2), c], 1))
        h = torch.zeros_like(h0)  # weak path: the middle output is a constant (the [MASK] analogue)
        if path == "full":
            h = h0
            for block in self.middle:
                self.middle_calls += 1
                h = h + block(torch.cat([h, c], 1))
        h = self.fuse(torch.cat([h, h0], 1))
        return self.decoder(torch.cat([h, c], 1)).reshape(x.shape)
