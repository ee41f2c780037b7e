"""The per-layer attention-tile search (Efficient-vDiT Stage 2, its Algorithm 1), under a FLOPs budget.

For every block l and every candidate mask m (a tile backend's options, e.g. R reference frames and a
frame window w), on calibration clips x_t (the teacher's data, noised at random t):

    y_l      = the teacher's attention output of block l                       (recorded in one forward)
    y_l,m    = the candidate backend with block l's projection weights, on block l's recorded input
    error    = sum ||y_l,m - y_l||^2 / sum ||y_l||^2                           (over all calibration clips)
    cost     = FLOPs of the candidate's `attend` / FLOPs of dense softmax (4 B H M^2 d)

Each layer's input is the teacher's own (teacher forcing), so layers are scored independently. Choice per
layer, among the candidates with cost <= budget: the most accurate (ties: the cheaper); with a threshold
r (the paper's Algorithm 1 keeps the sparsest mask whose loss stays under r): the cheapest with
error <= r, else the most accurate. If no candidate fits the budget, the cheapest is taken and flagged.
The choices become per-block option lists of the tile backend (model.attention_options).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from eflow.condition import Condition
from eflow.config import RunConfig
from eflow.data.batches import collate
from eflow.data.resize_crop import to_signed
from eflow.distill.capture import AttentionRecorder, attention_modules
from eflow.errors import EflowError
from eflow.model.tokens import TokenContext
from eflow.registry import get_registry
from eflow.timesteps import rand, randn


def tile_candidates(frames: int, max_reference: int = 2, max_window: int = 1) -> list[dict[str, int]]:
    """Tile masks to try on a grid of `frames` latent frames: R in 0..max_reference, w in 0..max_window
    (each capped at frames - 1), plus dense attention as R = 0, w = frames - 1 (cost 1)."""
    top_r, top_w = min(max_reference, frames - 1), min(max_window, frames - 1)
    found = [{"reference_frames": r, "frame_window": w} for r in range(top_r + 1) for w in range(top_w + 1)]
    dense = {"reference_frames": 0, "frame_window": frames - 1}
    return found if dense in found else [*found, dense]


def dense_flops(ctx: TokenContext, batch: int, heads: int, head_dim: int) -> float:
    """Forward matmul FLOPs of dense softmax attention on ctx's tokens: QK^T and PV, 4 M^2 d per head."""
    m = ctx.index.shape[1]
    return 4.0 * batch * heads * m * m * head_dim


@dataclass
class CalibrationBatch:
    """Noised latents of the teacher's data: x_t = (1 - t) x0 + t x1 at t ~ U(0, 1)."""

    x_t: Tensor  # [B, c, t, h, w]
    t: Tensor  # [B]
    cond: Condition


def calibration_batches(
    cfg: RunConfig,
    autoencoder,
    conditioner,
    *,
    clips: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[CalibrationBatch]:
    """`clips` random clips of the run's dataset (a pure function of `seed`), encoded and noised."""
    from eflow.assembly import build_dataset

    dataset = build_dataset(cfg)
    if len(dataset) == 0:
        raise EflowError(f"data.name = {cfg.data.name!r}: the teacher's dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(dataset), (clips,), generator=generator).tolist()
    out = []
    for start in range(0, clips, batch_size):
        raw = collate([dataset[i] for i in picks[start : start + batch_size]])
        with torch.no_grad():
            if "latents" in raw:
                x0 = raw["latents"].to(device).float()
            else:
                x0 = autoencoder.encode(to_signed(raw["video"].to(device))).float()
        b = x0.shape[0]
        t = rand(b, generator).to(device)
        x1 = randn(x0.shape, generator).to(device)
        tx = t.view(-1, *([1] * (x0.dim() - 1)))
        out.append(CalibrationBatch((1 - tx) * x0 + tx * x1, t, conditioner(raw, device)))
    return out


@dataclass
class LayerScore:
    """One candidate mask on one block: its options, cost (fraction of dense FLOPs) and relative error."""

    block: int
    options: dict[str, Any]
    cost: float
    error: float
    over_budget: bool = False  # chosen although no candidate fit the budget


@dataclass
class TileSearch:
    """The search's result: the choice of every block and the whole score table."""

    backend: str
    budget: float
    threshold: float | None
    choices: list[LayerScore]
    table: list[LayerScore] = field(default_factory=list)

    def attention_options(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """model.attention_options of the student: `base` plus one list per searched option, one entry per
        block (the tile backend's per-block lists)."""
        keys = sorted({k for c in self.choices for k in c.options})
        return {**(base or {}), **{k: [c.options[k] for c in self.choices] for k in keys}}

    def mean_cost(self) -> float:
        """Attention FLOPs of the chosen masks as a fraction of dense, averaged over blocks."""
        return sum(c.cost for c in self.choices) / max(len(self.choices), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "budget": self.budget,
            "threshold": self.threshold,
            "mean_cost": self.mean_cost(),
            "choices": [asdict(c) for c in self.choices],
            "table": [asdict(s) for s in self.table],
        }


def choose(scores: list[LayerScore], budget: float, threshold: float | None = None) -> LayerScore:
    """A block's mask from its candidates' scores (the rule in the module docstring)."""
    feasible = [s for s in scores if s.cost <= budget + 1e-9]
    if not feasible:
        cheapest = min(scores, key=lambda s: (s.cost, s.error))
        return LayerScore(cheapest.block, cheapest.options, cheapest.cost, cheapest.error, over_budget=True)
    if threshold is not None:
        good = [s for s in feasible if s.error <= threshold]
        if good:
            return min(good, key=lambda s: (s.cost, s.error))
    return min(feasible, key=lambda s: (s.error, s.cost))


def _candidate_module(entry, teacher: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The candidate backend sized like the teacher's attention module, on its device and dtype."""
    module = entry.create(teacher.dim, teacher.num_heads, options=options)
    param = next(teacher.parameters())
    return module.to(device=param.device, dtype=param.dtype).eval()


def _load_projections(module: nn.Module, teacher: nn.Module, block: int) -> None:
    """Copy the teacher block's attention weights into the candidate; it must need no others."""
    result = module.load_state_dict(teacher.state_dict(), strict=False)
    if result.missing_keys:
        raise EflowError(
            f"block {block}: the candidate backend needs weights the teacher's attention does not have "
            f"({result.missing_keys[:3]}); the tile search copies the teacher's projections"
        )


@torch.no_grad()
def search_tiles(
    model: nn.Module,
    batches: list[CalibrationBatch],
    candidates: list[dict[str, Any]],
    *,
    budget: float,
    threshold: float | None = None,
    backend: str = "tile",
    backend_options: dict[str, Any] | None = None,
) -> TileSearch:
    """Score every candidate mask on every block of the (teacher) `model` and choose one per block."""
    if not batches or not candidates:
        raise EflowError("the tile search needs calibration clips and at least one candidate mask")
    entry = get_registry("attention").get(backend)
    teachers = attention_modules(model)
    modules = [_candidate_module(entry, teachers[0], {**(backend_options or {}), **c}) for c in candidates]
    num = torch.zeros(len(teachers), len(candidates), dtype=torch.float64)
    den = torch.zeros(len(teachers), dtype=torch.float64)
    cost = torch.zeros(len(teachers), len(candidates), dtype=torch.float64)
    model.eval()
    for batch in batches:
        with AttentionRecorder(model, inputs=True) as rec:
            model(batch.x_t, batch.t, batch.t, batch.cond, torch.zeros_like(batch.t), path="full")
        for i, call in enumerate(rec.outputs()):
            reference = call.out.double()
            den[i] += reference.square().sum().cpu()
            b = call.x.shape[0]
            dense = dense_flops(call.ctx, b, teachers[i].num_heads, teachers[i].head_dim)
            for j, module in enumerate(modules):
                _load_projections(module, teachers[i], i)
                y = module(call.x, call.ctx)
                num[i, j] += (y.double() - reference).square().sum().cpu()
                flops = module.flops(call.ctx, b)
                if flops is None:
                    raise EflowError(f"attention '{backend}' defines no flops(); the budget needs it")
                cost[i, j] += flops / dense
    error = num / den.clamp_min(1e-300)[:, None]
    cost /= len(batches)
    table = [
        LayerScore(i, dict(c), float(cost[i, j]), float(error[i, j]))
        for i in range(len(teachers))
        for j, c in enumerate(candidates)
    ]
    per_block = [table[i * len(candidates) : (i + 1) * len(candidates)] for i in range(len(teachers))]
    choices = [choose(scores, budget, threshold) for scores in per_block]
    return TileSearch(backend, budget, threshold, choices, table)
