"""GLGA's input-aware gates (EFlow Eq. 7, [g_global, g_local] = sigmoid(X W_g)) in trained runs.

For each GLGA block of each run: the mean and spread of g_global and g_local over real clips of the
run's dataset noised to time t (x_t = (1 - t) x0 + t x1, FM's path), with their labels and guidance 0,
and the share of gates saturated (below 0.05 or above 0.95), where the sigmoid's slope is under 0.05
and a gate barely moves any more. Dense calls, as at sampling; the FM loss of the same call is printed
too (a run's closed gates need not show in its loss).

    python scripts/glga_gates.py RUN [RUN ...] [--num 32] [--t 0.5] [--device cpu] [--weights ema|model]

Written for docs/results.md: trained with SPRINT's 75% token dropping, the middle stack's gates of
the CPU demo's GLGA closed (g near 0.01) and stayed closed through the dense stage.
"""

from __future__ import annotations

import argparse

import torch

from eflow import Pipeline
from eflow.assembly import build_dataset
from eflow.condition import Condition


def gate_stats(run: str, num: int, t: float, device: str, weights: str = "ema") -> list[dict]:
    """The FM loss of the call, then one row per GLGA block with a gate: name, mean/std of each gate,
    saturated share."""
    pipe = Pipeline.from_run(run, device=device, weights=weights)
    parts, cfg = pipe.run.parts, pipe.run.cfg
    model = parts.model
    seen: dict[str, list[torch.Tensor]] = {}
    wrapped = []
    for name, module in model.named_modules():
        if getattr(module, "gate", None) is not None and type(module).__name__ == "GLGAttention":
            # wrap attend (not the gate Linear: CUDA's fused gated_glga reads gate.weight without calling it)
            def attend(q, k, v, ctx, x, module=module, name=name, inner=module.attend):
                logits = module.gate(x).float().unflatten(-1, (2, -1))  # [B, M, 2, 1 or H]
                g = torch.sigmoid(logits) if module.gate_fn == "sigmoid" else logits.softmax(dim=2)
                seen.setdefault(name, []).append(g)
                return inner(q, k, v, ctx, x)

            module.attend = attend
            wrapped.append(module)
    dataset = build_dataset(cfg)
    items = [dataset[i] for i in range(num)]
    video = torch.stack([item["video"] for item in items]).to(pipe.device)
    labels = torch.tensor([item.get("label", 0) for item in items], device=pipe.device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        x0 = parts.autoencoder.encode(video)
        x1 = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = (1 - t) * x0 + t * x1
        times = torch.full((num,), t, device=pipe.device)
        cond = Condition(labels=labels) if cfg.data.condition == "label" else None
        F = model(x_t, times, times, cond, torch.zeros(num, device=pipe.device))
    for module in wrapped:
        del module.attend  # the class's method again
    rows = [{"block": "(FM loss)", "loss": (F - (x1 - x0)).square().mean().item()}]
    for name, parts_seen in seen.items():
        g = torch.cat(parts_seen)  # [B, M, 2, 1 or H]
        g_global, g_local = g[:, :, 0], g[:, :, 1]
        rows.append(
            {
                "block": name,
                "g_global": (g_global.mean().item(), g_global.std().item()),
                "g_local": (g_local.mean().item(), g_local.std().item()),
                "saturated": ((g < 0.05) | (g > 0.95)).float().mean().item(),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--num", type=int, default=32, help="real clips (default 32)")
    ap.add_argument("--t", type=float, default=0.5, help="noise level of the clips (default 0.5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default="ema", help="ema or model (the online weights)")
    args = ap.parse_args()
    for run in args.runs:
        print(run)
        loss, *blocks = gate_stats(run, args.num, args.t, args.device, args.weights)
        print(f"  FM loss at t = {args.t} on these clips: {loss['loss']:.4f}")
        for r in blocks:
            (gm, gs), (lm, ls) = r["g_global"], r["g_local"]
            print(
                f"  {r['block']:16s} g_global {gm:.3f} (sd {gs:.3f})  g_local {lm:.3f} (sd {ls:.3f})"
                f"  saturated {r['saturated']:.2f}"
            )


if __name__ == "__main__":
    main()
