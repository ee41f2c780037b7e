"""The token context every attention backend receives: grid, kept indices, RoPE angles, a forward's cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenContext:
    """Where the M tokens a block sees sit on the latent token grid.

    grid:    (T', H', W') token grid; raster order is t-major, then h, then w.
    index:   [B, M] raster indices of the kept tokens, sorted ascending (all N when nothing is dropped).
    rope:    [B, M, head_dim // 2] RoPE angles of those tokens (apply with eflow.model.rope.apply_rope).
    dropped: True when M < N (some tokens were dropped before this block).
    cache:   what backends derive from `index` alone (flex block masks), filled through `cached`; one
             context serves one forward, so its blocks share the entries and no module keeps a global.
    """

    grid: tuple[int, int, int]
    index: Tensor
    rope: Tensor
    dropped: bool = False
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """build() on the first call for `key` in this context, its result on every later one."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    @property
    def num_tokens(self) -> int:
        """N = T' * H' * W', the dense token count."""
        t, h, w = self.grid
        return t * h * w

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    def scatter(self, x: Tensor, fill: float | Tensor = 0.0) -> Tensor:
        """[B, M, D] kept tokens -> [B, N, D] dense grid with `fill` at dropped places."""
        b, _, d = x.shape
        if not self.dropped:
            return x
        dense = x.new_empty(b, self.num_tokens, d)
        dense[:] = fill
        return dense.scatter_(
            1, self.index.unsqueeze(-1).expand(-1, -1, d), x
        )  # in place: one [B, N, D] buffer

    def gather(self, dense: Tensor) -> Tensor:
        """[B, N, D] dense grid -> [B, M, D] kept tokens."""
        if not self.dropped:
            return dense
        return dense.gather(1, self.index.unsqueeze(-1).expand(-1, -1, dense.shape[-1]))

    def select(self, index: Tensor, rope_table: Tensor) -> TokenContext:
        """A context for the subset `index` [B, M'] (raster indices) with its RoPE angles."""
        return TokenContext(self.grid, index, rope_table[index], index.shape[1] < self.num_tokens)

    @staticmethod
    def dense(grid: tuple[int, int, int], batch: int, rope_table: Tensor) -> TokenContext:
        """The context of the full grid: every token kept."""
        n = grid[0] * grid[1] * grid[2]
        # raster indices and RoPE angles materialized per sample, as `select` makes them (B N values and
        # B N head_dim/2 angles, small): one memory layout for compiled blocks, dropped tokens or not
        index = torch.arange(n, device=rope_table.device).expand(batch, n).contiguous()
        return TokenContext(grid, index, rope_table.unsqueeze(0).expand(batch, -1, -1).contiguous(), False)
