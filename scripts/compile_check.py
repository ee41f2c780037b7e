"""Per-block torch.compile against eager, fp32, on the tiny model with every weight moved off its init:
the largest gradient difference (relative to that gradient's scale) after one backward through a full
pass of B samples (dropped tokens) plus a weak pass of W samples, and Dynamo's graph breaks. Issue 13:
on an H200 the EFlow recipe's gradient norm jumped to ~1e6 compiled on exactly the steps whose
weak-path call held one sample (XL, GLGA); FM + softmax compiled trained as eager. Variants isolate
the cause: GLGA's fused CUDA graph (sigmoid gate), GLGA unfused (softmax gate), softmax attention;
ac off, selective and full. TORCH_LOGS=graph_breaks prints each break's user stack.
Usage: [MIX_ORDER=on] python3 scripts/compile_check.py [cuda|cpu]; writes $OUT/compile_check.json.
(On 2026-12-01 an earlier version of this check, run on the zero-init model, found the graph break
that docs/scaling.md names; its gradient differences said nothing, the gradients being mostly zero.
On an H200, 2026-12-01, the bb8731c version (the fused GLGA called through torch.compiler.disable,
since backed out; raw: docs/benchmarks/parallel_h200/eleventh_session/compile_check_tiny_cuda.json):
every variant within 8.2e-4 of eager, one-sample calls included. The tiny model's reductions are too
small for Inductor's mix-order reduction, the likely cause of the XL failure; compiled blocks now run
without it (eflow.parallel.parallelize.inductor_options), MIX_ORDER=on keeps Inductor's default here.
The check at XL size is `scripts/gpu_parallel.sh`'s compile cases.)
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from eflow.condition import Condition
from eflow.model.dit import build_model
from eflow.parallel.config import ParallelSection
from eflow.parallel.parallelize import parallelize
from eflow.train.distributed import World

if os.environ.get("MIX_ORDER") == "on":
    import eflow.parallel.parallelize as parallelize_module

    parallelize_module.inductor_options = lambda: {}  # Inductor's defaults, as before 2026-12-01

VARIANTS = {
    "glga (fused on CUDA)": ("glga", {}),
    "glga, softmax gate (unfused)": ("glga", {"gate_fn": "softmax"}),
    "softmax": ("softmax", {}),
}


def grads(model: torch.nn.Module, b: int, w: int, dev: torch.device) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    x, t = torch.randn(3, 3, 2, 8, 8, device=dev), torch.rand(3, device=dev)
    labels = torch.tensor([1, 2, 3], device=dev)
    keep = torch.tensor([[0, 2, 5, 7], [1, 2, 3, 4], [0, 1, 6, 7]], device=dev)
    model.zero_grad(set_to_none=True)
    full = model(x[:b], t[:b], 0.5 * t[:b], Condition(labels=labels[:b]), 3.0, keep=keep[:b])
    weak = model(x[:w], t[:w], t[:w], Condition(labels=labels[:w]), 0.0, path="weak")
    (full.square().mean() + weak.abs().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    rows = []
    for variant, (attention, options) in VARIANTS.items():
        torch.manual_seed(0)
        base = build_model("tiny", attention=attention, attention_options=options).to(dev)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.05 * torch.randn_like(p))
        for ac in ("off", "selective", "full"):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = parallelize(copy.deepcopy(base), ParallelSection(ac=ac, compile=True), World(), dev)
            for b, w in ((3, 3), (3, 1), (1, 1), (3, 1)):
                ref, got = grads(base, b, w, dev), grads(compiled, b, w, dev)
                rel = {
                    n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12)).item()
                    for n in ref
                }
                worst = max(rel, key=rel.get)
                breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
                rows.append(
                    {"variant": variant, "ac": ac, "B": b, "W": w, "worst": worst, "rel_diff": rel[worst],
                     "graph_breaks": breaks}
                )  # fmt: skip
                print(
                    f"{variant:30s} ac={ac:9s} B={b} W={w}: largest relative gradient difference "
                    f"{rel[worst]:.2e} ({worst}); graph breaks so far {breaks}",
                    flush=True,
                )
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compile_check.json"), "w") as f:
        json.dump({"torch": torch.__version__, "device": str(dev), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
