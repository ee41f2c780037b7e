"""What an objective or sampler calls: the model, its EMA copy, token dropping and a pass counter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eflow.condition import Condition


def pass_seed(seed: int, pass_id: int) -> int:
    """The seed of one pass's token-drop draw: a function of the step's seed and the pass (any int)."""
    return (seed * 6_364_136_223_846_793_005 + (pass_id + 2**31) * 1_442_695_040_888_963_407) % (2**63 - 1)


@dataclass
class DropPlan:
    """Token dropping for the middle stack: a token-drop plugin, a ratio, and the keys of its draws.

    The kept tokens of a sample in a pass are row `rows[i]` of one draw for the step's whole global batch
    (`global_batch` rows, on the CPU, seeded by pass_seed(seed, pass id)): they depend on the sample and
    the pass, not on which rank holds the sample or which other passes share its model call, so one
    process and N at the same global batch drop the same tokens (docs/scaling.md). `batch_start` is the
    global row of this rank's first local row.
    """

    selector: object  # has .select(grid, batch, ratio, generator) -> index [B, M]
    ratio: float
    seed: int = 0
    global_batch: int | None = None
    batch_start: int = 0

    def keep(self, grid: tuple[int, int, int], rows: Tensor, pass_ids: Tensor) -> Tensor:
        """[n, M] kept-token indices for rows [n] (global sample indices) of passes pass_ids [n] (long)."""
        rows, pass_ids = rows.long().cpu(), pass_ids.long().cpu()
        if not len(rows):
            return self.selector.select(grid, 0, self.ratio, torch.Generator())
        total = self.global_batch if self.global_batch is not None else int(rows.max()) + 1
        if int(rows.min()) < 0 or int(rows.max()) >= total:
            raise ValueError(
                f"token-drop rows must lie in [0, {total}) (the global batch), got {rows.tolist()}"
            )
        kept: Tensor | None = None
        for pass_id in pass_ids.unique().tolist():
            mine = (pass_ids == pass_id).nonzero().squeeze(1)
            generator = torch.Generator().manual_seed(pass_seed(self.seed, pass_id))
            drawn = self.selector.select(grid, total, self.ratio, generator)  # [global batch, M]
            if kept is None:
                kept = drawn.new_empty((len(rows), drawn.shape[1]))
            kept[mine] = drawn[rows[mine]]
        return kept  # type: ignore[return-value]


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
        n = x_t.shape[0]
        if rows is None:
            # a pass of its own over its rows in batch order; negative ids keep clear of the keyed passes
            self._unkeyed_calls += 1
            rows, pass_id = self.drop.batch_start + torch.arange(n), -self._unkeyed_calls
        if pass_id is None:
            raise ValueError(
                "Network: `rows` needs its `pass_id` (which of the step's passes each row is in)"
            )
        pass_ids = torch.as_tensor(pass_id, dtype=torch.long)
        if pass_ids.ndim == 0:
            pass_ids = pass_ids.expand(n)
        return self.drop.keep(self.model.token_grid(x_t.shape), rows, pass_ids).to(x_t.device)

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
    ) -> Tensor:
        """f(x_t, t, s) = x_t + (s - t) F; target="online" (grad if enabled), "sg" (online, no grad) or "ema"."""
        if target == "ema":
            F = self.ema(x_t, t, s, cond, guidance, path)
        elif target == "sg":
            with torch.no_grad():
                F = self(x_t, t, s, cond, guidance, path)
        else:
            F = self(x_t, t, s, cond, guidance, path)
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
