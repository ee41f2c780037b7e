"""Graph breaks and recompiles of per-block torch.compile under each activation-checkpointing option on
CUDA (issue 13: the EFlow recipe's gradient blew up with ac = selective + compile on an H200 while ac =
full + compile and ac = off + compile trained). The tiny model with GLGA (its fused CUDA path), one
full pass with dropped tokens plus one weak pass under one backward, twice, compiled, against the same
model eager in fp32 (as tests/test_parallel.py's CUDA test does), every weight moved off its init: the
largest output and gradient differences, and Dynamo's graph-break reasons and unique-graph count.
(Its first run, on 2026-12-01, used the zero-init model, whose gradients are mostly zero: its
differences said nothing; its graph breaks stand.) Run with
TORCH_LOGS=graph_breaks for each break's user stack. Usage on the GPU machine:
  TORCH_LOGS=graph_breaks python3 scripts/graph_breaks.py [off selective full]
Writes $OUT/graph_breaks.json.
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


def forward_backward(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)
    x, t = torch.randn(3, 3, 2, 8, 8).to(device), torch.rand(3).to(device)
    cond = Condition(labels=torch.tensor([1, 2, 3], device=device))
    keep = torch.tensor([[0, 2, 5, 7], [1, 2, 3, 4], [0, 1, 6, 7]], device=device)
    model.zero_grad(set_to_none=True)
    full = model(x, t, 0.5 * t, cond, 3.0, keep=keep)
    weak = model(x, t, t, cond, 0.0, path="weak")
    (full.square().mean() + weak.abs().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([full.flatten(), weak.flatten()]).detach(), grads


def main() -> None:
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model("tiny").to(cuda)
    with torch.no_grad():  # off the zero init (else the output and most gradients are zero)
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected_out, expected_grads = forward_backward(copy.deepcopy(base), cuda)
    results = []
    for ac in sys.argv[1:] or ["off", "selective", "full"]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = parallelize(copy.deepcopy(base), ParallelSection(ac=ac, compile=True), World(), cuda)
        row = {"ac": ac}
        try:
            for call in range(2):
                out, grads = forward_backward(model, cuda)
                row[f"call{call}_out_max_abs"] = (out - expected_out).abs().max().item()
                row[f"call{call}_grad_max_abs"] = max(
                    (grads[n] - expected_grads[n]).abs().max().item() for n in expected_grads
                )
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        counters = torch._dynamo.utils.counters
        row["graph_breaks"] = {k.splitlines()[0][:200]: v for k, v in counters["graph_break"].items()}
        row["unique_graphs"] = counters["stats"]["unique_graphs"]
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "graph_breaks.json"), "w") as f:
        json.dump(
            {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": results}, f, indent=1
        )


if __name__ == "__main__":
    main()
