"""What an objective or sampler calls: the model, its EMA copy, token dropping and a pass counter."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eflow.condition import Condition

TOKENS_PER_DRAW = 4096  # rows drawn together: enough for this many tokens (rows_per_draw)


def rows_per_draw(grid: tuple[int, int, int]) -> int:
    """Rows of the global batch that share one token-drop draw: 4096 // tokens, at least 1 (8 rows at
    8x8x8 tokens, 1 at 32,760). It depends on the token grid alone, never on the number of GPUs."""
    return max(1, TOKENS_PER_DRAW // math.prod(grid))


def pass_seed(seed: int, pass_id: int, chunk: int) -> int:
    """The seed of one token-drop draw: rows chunk * c ... (chunk + 1) * c - 1 of pass `pass_id` (any int)."""
    mixed = (
        seed * 6_364_136_223_846_793_005
        + (pass_id + 2**31) * 1_442_695_040_888_963_407
        + chunk * 2_654_435_761
    )
    return mixed % (2**63 - 1)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, without waiting for the GPU's queue."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@dataclass
class DropPlan:
    """Token dropping for the middle stack: a token-drop plugin, a ratio, and the keys of its draws.

    The kept tokens of global row r in a pass are row r mod c of the draw for rows c (r // c) ... of that
    pass (c = rows_per_draw(grid); a CPU generator seeded by pass_seed(seed, pass id, r // c)): they depend
    on the sample and the pass, not on which rank holds the sample or which passes share its model call,
    so one process and N at the same global batch drop the same tokens (docs/scaling.md). A rank draws
    only the chunks of its own rows: [batch_start, batch_start + local_batch) of the global batch.
    """

    selector: object  # has .select(grid, batch, ratio, generator) -> index [B, M]
    ratio: float
    seed: int = 0
    local_batch: int | None = None  # rows of this rank (None: read from the rows of each call)
    batch_start: int = 0

    def draw(self, grid: tuple[int, int, int], pass_id: int, lo: int, hi: int) -> Tensor:
        """[hi - lo, M] kept-token indices of global rows lo ... hi - 1 of pass `pass_id` (on the CPU)."""
        c = rows_per_draw(grid)
        first, last = lo // c, (hi - 1) // c
        chunks = [
            self.selector.select(
                grid, c, self.ratio, torch.Generator().manual_seed(pass_seed(self.seed, pass_id, k))
            )
            for k in range(first, last + 1)
        ]
        return torch.cat(chunks)[lo - first * c : hi - first * c]

    def keep(
        self, grid: tuple[int, int, int], rows: Tensor, pass_ids: Tensor, span: tuple[int, int]
    ) -> Tensor:
        """[n, M] kept-token indices for rows [n] (global sample indices, on the model's device; no host
        sync) of passes pass_ids [n] (CPU, long), all rows in [span[0], span[1]), on rows' device."""
        lo, hi = span
        kept: Tensor | None = None
        for pass_id in pass_ids.unique().tolist():
            table = to_device(self.draw(grid, pass_id, lo, hi), rows.device)
            mine = to_device((pass_ids == pass_id).nonzero().squeeze(1), rows.device)
            if kept is None:
                kept = table.new_empty((len(rows), table.shape[1]))
            kept[mine] = table[rows[mine] - lo]
        if kept is None:  # no rows
            return self.selector.select(grid, 0, self.ratio, torch.Generator()).to(rows.device)
        return kept


class Network:
    """Calls the model like `model(x_t, t, s, cond, guidance, path)` and counts forward passes per sample.

    With a DropPlan, every full-path call drops tokens in the middle stack: a sample's kept tokens are
    keyed by its global row and its pass (`rows`, `pass_id`; objectives that batch several passes into
    one call give both). A call without them is a pass of its own with its rows in batch order (the
    whole local batch: global rows batch_start, batch_start + 1, ...), numbered by a counter of such calls.
    `counts` holds samples pushed through each kind of pass: full_grad, full_nograd, weak.
    """

    def __init__(self, model: nn.Module, ema: nn.Module | None = None, drop: DropPlan | None = None):
        self.model = model
        self.ema_model = ema
        self.drop = drop
        self.counts: Counter[str] = Counter()
        self._unkeyed_calls = 0

    def _keep(
        self, x_t: Tensor, path: str, rows: Tensor | None, pass_id: Tensor | int | None
    ) -> Tensor | None:
        if self.drop is None or self.drop.ratio <= 0 or path != "full":
            return None
        n, plan = x_t.shape[0], self.drop
        if rows is None:
            if pass_id is not None:
                raise ValueError("Network: `pass_id` needs `rows` (each row's index in the global batch)")
            # a pass of its own over the rows in batch order, numbered from -1 down (clear of keyed passes);
            # over the local batch (FM's one call) those are global rows batch_start, batch_start + 1, ...
            self._unkeyed_calls += 1
            start = (
                plan.batch_start
                if plan.local_batch in (None, n)
                else plan.batch_start // plan.local_batch * n
            )
            rows, pass_id, span = torch.arange(start, start + n), -self._unkeyed_calls, (start, start + n)
        elif pass_id is None:
            raise ValueError(
                "Network: `rows` needs its `pass_id` (which of the step's passes each row is in)"
            )
        elif plan.local_batch is not None:
            span = (plan.batch_start, plan.batch_start + plan.local_batch)
        else:  # no local batch given: the rows' own range (reads them on the host)
            span = (int(rows.min()), int(rows.max()) + 1)
        pass_ids = torch.as_tensor(pass_id, dtype=torch.long, device="cpu")
        if pass_ids.ndim == 0:
            pass_ids = pass_ids.expand(n)
        rows = to_device(rows, x_t.device) if rows.device.type == "cpu" else rows.to(x_t.device)
        return plan.keep(self.model.token_grid(x_t.shape), rows, pass_ids, span)

    def _count(self, n: int, path: str, grad: bool) -> None:
        self.counts["weak" if path == "weak" else ("full_grad" if grad else "full_nograd")] += n

    def _forward(
        self, model: nn.Module, x_t, t, s, cond, guidance, path: str, grad: bool, rows, pass_id
    ) -> Tensor:
        self._count(x_t.shape[0], path, grad)
        return model(x_t, t, s, cond, guidance, path=path, keep=self._keep(x_t, path, rows, pass_id))

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
        rows: Tensor | None = None,
        pass_id: Tensor | int | None = None,
    ) -> Tensor:
        """F of the online model; gradient flows when torch.is_grad_enabled(). rows [n] and pass_id (int or
        [n]) key the token-drop draw of each row (see the class docstring); both optional."""
        return self._forward(
            self.model, x_t, t, s, cond, guidance, path, torch.is_grad_enabled(), rows, pass_id
        )

    @torch.no_grad()
    def ema(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
        rows: Tensor | None = None,
        pass_id: Tensor | int | None = None,
    ) -> Tensor:
        """F of the EMA model (no gradient); falls back to the online model under no_grad if there is none."""
        model = self.ema_model if self.ema_model is not None else self.model
        return self._forward(model, x_t, t, s, cond, guidance, path, False, rows, pass_id)

    def solution(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition,
        guidance: Tensor | None = None,
        path: str = "full",
        target: str = "online",
        rows: Tensor | None = None,
        pass_id: Tensor | int | None = None,
    ) -> Tensor:
        """f(x_t, t, s) = x_t + (s - t) F; target="online" (grad if enabled), "sg" (online, no grad) or "ema";
        rows and pass_id key the token drop as in __call__."""
        if target == "ema":
            F = self.ema(x_t, t, s, cond, guidance, path, rows, pass_id)
        elif target == "sg":
            with torch.no_grad():
                F = self(x_t, t, s, cond, guidance, path, rows, pass_id)
        else:
            F = self(x_t, t, s, cond, guidance, path, rows, pass_id)
        return solution_map(x_t, t, s, F)


def solution_map(x_t: Tensor, t: Tensor, s: Tensor, F: Tensor) -> Tensor:
    """f = x_t + (s - t) F with t, s [B] broadcast over the sample's dims (exactly x_t when s == t).

    Computed in at least float32: a bf16 F must not quantize small time gaps.
    """
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    gap = (s - t).to(dtype).view(-1, *([1] * (F.dim() - 1)))
    return (x_t.to(dtype) + gap * F.to(dtype)).to(x_t.dtype)


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))
