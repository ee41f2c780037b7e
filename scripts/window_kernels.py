"""Which kernel runs GLGA's local window fastest on this GPU (issue 17's lever list): the band softmax
|n_i - n_j| <= r over all N tokens (no dropping, so raster index = position and the band is a sliding
window of r keys on each side), forward + backward in bf16, against dense cuDNN softmax on the same
tokens. Kernels, each checked against flex's output before it is timed:
  flex     flex_attention with GLGA's band BlockMask (what the glga backend runs; compiled)
  fa2      PyTorch's bundled FlashAttention-2 with window_size_left = window_size_right = r
           (torch.ops.aten._flash_attention_forward / _backward; exact only without dropped tokens)
  xformers xformers.ops.memory_efficient_attention with LocalAttentionFromBottomRightMask(r, r), when
           xformers imports (its wheel in .whl/)
  cudnn    dense SDPA (cuDNN), every key: the baseline GLGA is measured against
Usage on the GPU machine: python3 scripts/window_kernels.py [--frames 21 --height 30 --width 52
--heads 12 --head-dim 128 --window-frames 4]; prints a table and writes $OUT/window_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, warmup: int = 2, reps: int = 7) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class WindowFA2(torch.autograd.Function):
    """Sliding-window softmax through FlashAttention-2 as PyTorch bundles it: q, k, v [1, N, H, d].

    The aten backward takes its sequence offsets as tensors and treats any defined tensor as
    variable-length input, so both directions run the variable-length form: one sequence, offsets
    [0, N], tokens flattened to [N, H, d]. (The first probe passed empty offsets to the backward:
    "batch size must be positive".)"""

    @staticmethod
    def forward(ctx, q, k, v, radius):
        n = q.shape[1]
        offsets = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        q, k, v = q[0], k[0], v[0]  # [N, H, d]
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, offsets, offsets, n, n, 0.0, False, False,
            window_size_left=radius, window_size_right=radius,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, rng, unused, offsets)
        ctx.radius = radius
        return out[None]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, rng, unused, offsets = ctx.saved_tensors
        n = q.shape[0]
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad[0].contiguous(), q, k, v, out, lse, offsets, offsets, n, n, 0.0, False, rng, unused,
            window_size_left=ctx.radius, window_size_right=ctx.radius,
        )  # fmt: skip
        return dq[None], dk[None], dv[None], None


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (
        ("frames", 21),
        ("height", 30),
        ("width", 52),
        ("heads", 12),
        ("head-dim", 128),
        ("window-frames", 4),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    from eflow.plugins.attention.glga import (
        band_block_mask,
        local_attention_flex,
        window_pairs,
        window_radius,
    )

    grid = (args.frames, args.height, args.width)
    n = args.frames * args.height * args.width
    radius = window_radius(grid, args.window_frames)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(1, n, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3)
    )
    index = torch.arange(n, device=dev)[None]
    mask = band_block_mask(index, radius, pad_inputs=True)
    pairs = window_pairs(index, radius)
    band_flops = 3.5 * 4.0 * args.heads * args.head_dim * pairs
    dense_flops = 3.5 * 4.0 * args.heads * args.head_dim * n * n

    kernels = {
        "flex": lambda a, b, c: local_attention_flex(a, b, c, index, radius, True, mask),
        "fa2": lambda a, b, c: WindowFA2.apply(a, b, c, radius),
    }
    try:
        from xformers.ops import fmha

        bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(window_left=radius, window_right=radius)
        kernels["xformers"] = lambda a, b, c: fmha.memory_efficient_attention(a, b, c, attn_bias=bias)
    except Exception as err:  # not installed, or no kernel for this GPU / torch
        print(f"xformers: not available ({type(err).__name__}: {str(err).splitlines()[0][:120]})")

    def cudnn(a, b, c):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (a, b, c))).transpose(1, 2)

    reference = None
    rows = []
    print(f"N = {n} ({grid}), {args.heads} heads x {args.head_dim}, radius {radius}, bf16, fwd+bwd")
    for name, fn in [*kernels.items(), ("cudnn", cudnn)]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            out = fn(*leaves)
            out.float().square().mean().backward()
            if name == "flex":
                reference = (out.detach().float(), [t.grad.float() for t in leaves])
            check = None
            if reference is not None and name != "cudnn":
                err = (out.detach().float() - reference[0]).abs().max().item()
                gerr = max(
                    (t.grad.float() - g).abs().max().item() for t, g in zip(leaves, reference[1], strict=True)
                )
                check = {"out_max_abs": err, "grad_max_abs": gerr}
            grad = torch.randn_like(out)

            def step(fn=fn, leaves=leaves, grad=grad):
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(grad)

            ms = timed(step)
            flops = dense_flops if name == "cudnn" else band_flops
            rows.append({"kernel": name, "ms": ms, "tflops": flops / ms / 1e9, "check": check})
            print(f"{name:9s} {ms:8.2f} ms  {flops / ms / 1e9:6.0f} TF/s  check {check}")
        except Exception as err:
            rows.append({"kernel": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
            print(f"{name:9s} failed: {rows[-1]['error']}")
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "window_kernels.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "tokens": n,
                "radius": radius,
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(),
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
