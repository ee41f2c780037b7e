"""The softmax backend's `kernel` option: one SDPA backend pinned instead of cuDNN-first, each checked
against the readable reference (softmax(q k^T / sqrt(d)) v written out); a kernel that cannot run the
inputs is a ConfigError naming the option and the choices, never a silent fallback to another kernel."""

from __future__ import annotations

import warnings

import attention_inputs
import pytest
import torch
from attention_inputs import perturbed, rel_err

from eflow.errors import ConfigError
from eflow.plugins.attention.softmax import KERNELS, SoftmaxAttention
from eflow.registry import get_registry

DIM, HEADS = 32, 2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def attend_and_reference(module: SoftmaxAttention, device: str, dtype: torch.dtype, keep: int | None = 40):
    """The module's attend and its reference (fp64) on the same projected q, k, v: [B, M, H, d] each,
    plus the gradients of sum(o^2) with respect to q from both."""
    ctx = attention_inputs.make_ctx((6, 3, 4), 2, keep, DIM // HEADS, 0, device)
    x = torch.randn(2, ctx.index.shape[1], DIM, dtype=next(module.parameters()).dtype, device=device)
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
    results = []
    for fn, cast in ((module.attend, dtype), (module.reference, torch.float64)):
        # a leaf of its own: the attend's and the reference's gradients are never one shared tensor
        qi = q.detach().to(cast).clone().requires_grad_()
        o = fn(qi, k.to(cast), v.to(cast), ctx, x.to(cast))
        o.double().square().sum().backward()
        results.append((o.double(), qi.grad.double()))
    return results


@pytest.mark.parametrize("kernel", ["auto", "flash", "math"])  # the ones SDPA has on the CPU
def test_each_kernel_the_cpu_has_matches_the_reference(kernel):
    module = perturbed(SoftmaxAttention(DIM, HEADS, kernel=kernel)).double()
    (out, grad), (want, want_grad) = attend_and_reference(module, "cpu", torch.float64)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(grad, want_grad, atol=1e-10, rtol=1e-8)
    q = torch.zeros(1, 8, HEADS, DIM // HEADS)
    assert module.kernel(q) == ("SDPA (CPU)" if kernel == "auto" else f"SDPA {kernel} (the kernel option)")


def test_a_kernel_that_cannot_run_the_inputs_is_an_error_naming_the_option_and_the_choices():
    module = SoftmaxAttention(DIM, HEADS, kernel="cudnn")  # cuDNN attention is CUDA-only
    q = torch.randn(1, 8, HEADS, DIM // HEADS)
    with warnings.catch_warnings(), pytest.raises(ConfigError) as err:
        warnings.simplefilter("ignore")  # SDPA's own per-kernel reasons
        module.attend(q, q, q, None, q.flatten(2))
    message = str(err.value)
    assert "kernel = 'cudnn'" in message and "cpu" in message and "float32" in message
    assert all(name in message for name in ("auto", *KERNELS))


def test_under_torch_compile_a_pinned_kernel_runs_or_is_the_same_error():
    """Per-block compile traces attend with fake tensors, where SDPA's refusal would surface as a Dynamo
    error: the kernel is checked before tracing reaches SDPA (a probe whose answer is a constant of the
    graph), so the refusal is the same ConfigError, and a kernel that runs adds no graph break."""
    q = torch.randn(2, 16, HEADS, DIM // HEADS)
    for kernel in ("math", "cudnn"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        module = SoftmaxAttention(DIM, HEADS, kernel=kernel)
        attend = torch.compile(lambda q, m=module: m.attend(q, q, q, None, q.flatten(2)), backend="eager")
        if kernel == "cudnn":  # CUDA-only
            with warnings.catch_warnings(), pytest.raises(ConfigError, match="kernel = 'cudnn'"):
                warnings.simplefilter("ignore")
                attend(q)
            continue
        torch.testing.assert_close(attend(q), module.reference(q, q, q, None, None), atol=1e-6, rtol=1e-5)
        assert not torch._dynamo.utils.counters["graph_break"]


def test_an_unknown_kernel_is_refused_with_the_choices():
    registered = get_registry("attention").get("softmax")
    with pytest.raises(
        ConfigError, match="kernel: Input should be 'auto', 'cudnn', 'flash', 'efficient' or 'math'"
    ):
        registered.parse_options({"kernel": "fa3"})
    assert registered.parse_options({"kernel": "flash"}).kernel == "flash"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["auto", *KERNELS])
def test_each_kernel_matches_the_reference_on_cuda_in_bf16(kernel):
    """Every SDPA backend runs bf16 with head dim 16 on a Hopper GPU (auto is cuDNN there); within bf16
    rounding of the fp64 reference, forward and gradient, with and without dropped tokens."""
    module = perturbed(SoftmaxAttention(DIM, HEADS, kernel=kernel)).float().cuda()
    for keep in (None, 40):
        (out, grad), (want, want_grad) = attend_and_reference(module, "cuda", torch.bfloat16, keep)
        assert rel_err(out, want) < 2e-2 and rel_err(grad, want_grad) < 5e-2, (kernel, keep)


@pytest.mark.gpu
@cuda
def test_kernels_that_need_half_precision_refuse_fp32_on_cuda():
    """FlashAttention-2 and cuDNN take bf16 / fp16 only: pinned in fp32 they are an error, not a silent
    switch to another kernel; the memory-efficient and math kernels run fp32 and match the reference."""
    for kernel in ("efficient", "math"):
        module = perturbed(SoftmaxAttention(DIM, HEADS, kernel=kernel)).float().cuda()
        (out, _), (want, _) = attend_and_reference(module, "cuda", torch.float32)
        assert rel_err(out, want) < 1e-4, kernel
    q = torch.randn(1, 64, HEADS, DIM // HEADS, device="cuda")
    for kernel in ("flash", "cudnn"):
        with warnings.catch_warnings(), pytest.raises(ConfigError, match=f"kernel = '{kernel}'"):
            warnings.simplefilter("ignore")
            SoftmaxAttention(DIM, HEADS, kernel=kernel).attend(q, q, q, None, q.flatten(2))
