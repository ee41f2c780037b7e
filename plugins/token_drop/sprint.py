"""The `sprint` token-drop strategy: SPRINT's structured group-wise subsampling."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from eflow.api import TokenDrop


class SprintOptions(BaseModel):
    """Options of the `sprint` strategy."""

    model_config = ConfigDict(extra="forbid")

    group: tuple[int, int, int] = Field(
        (2, 2, 2), description="Group size over (t, h, w); clamped to the grid (images: (1, 2, 2))."
    )

    @field_validator("group")
    @classmethod
    def _positive(cls, group: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(group) < 1:
            raise ValueError(f"group sizes must be >= 1, got {group}")
        return group


class SprintDrop(TokenDrop):
    """Splits the (T', H', W') grid into groups and keeps k random members of each.

    k = max(1, round_half_up(size * (1 - ratio))) per group: 2 of a 2x2x2 group at 75%, 1 of a 2x2 group
    for images (T' = 1, where the t extent clamps to 1). Partial groups at the grid edges keep k of their
    own size. The group layout is the same for every sample, so M is constant across the batch;
    which members are kept is random per sample (local coverage, global randomness).
    """

    def __init__(self, group: tuple[int, int, int] = (2, 2, 2)):
        self.group = tuple(SprintOptions(group=group).group)

    def layout(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """group id [N] of every token (raster order) and size [G] of every group."""
        ids, counts = [], []
        for size, g in zip(grid, self.group, strict=True):
            g = min(g, size)
            ids.append(torch.arange(size) // g)
            counts.append(math.ceil(size / g))
        gt, gh, gw = ids  # group coordinate per axis
        group_id = (gt[:, None, None] * counts[1] + gh[None, :, None]) * counts[2] + gw[None, None, :]
        group_id = group_id.reshape(-1)  # [N]
        return group_id, torch.bincount(group_id, minlength=math.prod(counts))

    def keep_per_group(self, sizes: Tensor, ratio: float) -> Tensor:
        """k [G]: round_half_up(size * (1 - ratio)), at least 1."""
        return torch.floor(sizes.double() * (1.0 - ratio) + 0.5 + 1e-9).long().clamp(min=1)

    def keep(self, grid, batch, ratio, generator, device) -> Tensor:
        """[B, M] sorted raster indices, M = sum of k over groups."""
        group_id, sizes = self.layout(grid)
        group_id, sizes = group_id.to(device), sizes.to(device)
        k = self.keep_per_group(sizes, ratio)  # [G]
        n = group_id.numel()
        # Shuffle, then stable-sort by group: each group becomes a contiguous run in random order.
        perm = torch.rand(batch, n, generator=generator, device=device).argsort(dim=1)  # [B, N]
        order = perm.gather(1, group_id[perm].argsort(dim=1, stable=True))  # [B, N]
        # The run layout is identical for every row: keep the first k of each run.
        run_group = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)  # [N]
        run_start = torch.cumsum(sizes, 0) - sizes  # [G]
        rank = torch.arange(n, device=device) - run_start[run_group]  # [N] position within the group
        kept = order[:, rank < k[run_group]]  # [B, M]
        return kept.sort(dim=1).values
