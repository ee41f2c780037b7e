"""Self-attention backends against the readable references in eflow.model.attention_reference.

Every registered attention backend is checked against a reference of its `attend` step, the part
after the shared projection, QK norm and RoPE: reference(module, q, k, v, ctx, x) -> [B, M, H, d].
A backend provides it in REFERENCES below, or as a method `reference(q, k, v, ctx, x)` on its module
class (handy for third-party backends); a registered backend with neither fails the test. The test
builds q, k, v with the module's own `project` and applies its `proj`, so backends subclass SelfAttention.
"""

from __future__ import annotations

import contextlib
import warnings

import attention_inputs
import pytest
import torch
from attention_inputs import (
    listed_blocks,
    outputs_and_input_grads,
    perturbed,
    real_block_pairs,
    rel_err,
)

from eflow.model.attention_reference import dense_attention, linear_attention_reference, window_mask
from eflow.plugins.attention.glga import (
    GLGAOptions,
    GLGAttention,
    linear_attention,
    local_attention_flex,
    window_radius,
)
from eflow.registry import get_registry

GRID = (6, 3, 4)  # N = 72; glga's default 4-frame window: radius 24, so the band really restricts
DIM, HEADS, BATCH = 32, 2, 2


def make_ctx(grid=GRID, batch=BATCH, keep=None, head_dim=DIM // HEADS, seed=0, device="cpu"):
    return attention_inputs.make_ctx(grid, batch, keep, head_dim, seed, device)


def rms(x, weight, eps=1e-6):
    """RMSNorm over the last dim, written out."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def softmax_reference(module, q, k, v, ctx, x):
    return dense_attention(q, k, v)  # every kept token sees every kept token


def glga_reference(module, q, k, v, ctx, x):
    """Eqs. (5)-(8) from the reference pieces; the window on the tokens' original raster indices."""
    o_global = rms(linear_attention_reference(q, k, v), module.norm_global.weight) if module.use_global else 0
    if module.use_local:
        mask = window_mask(ctx.index, window_radius(ctx.grid, module.window_frames))
        o_local = rms(dense_attention(q, k, v, mask), module.norm_local.weight)
    if module.branches == "linear":
        return o_global
    if module.branches == "window":
        return o_local
    if module.branches == "sum":
        return o_global + o_local
    logits = (x @ module.gate.weight.T + module.gate.bias).unflatten(-1, (2, -1))  # [B, M, 2, 1 or H]
    g = (torch.sigmoid(logits) if module.gate_fn == "sigmoid" else torch.softmax(logits, dim=2))[..., None]
    return g[:, :, 0] * o_global + g[:, :, 1] * o_local


REFERENCES = {
    "softmax": softmax_reference,
    "glga": glga_reference,
}  # written here, independent of the modules


@pytest.mark.parametrize("name", ["softmax", "glga"])
def test_module_reference_methods_agree_with_the_test_references(name):
    module = perturbed(get_registry("attention").create(name, DIM, HEADS)).double()
    ctx = make_ctx(keep=40)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    q, k, v = module.project(x, ctx)
    torch.testing.assert_close(module.reference(q, k, v, ctx, x), REFERENCES[name](module, q, k, v, ctx, x))


def check_against_reference(module, ctx, reference, seed=1, atol=1e-9):
    torch.manual_seed(seed)
    x = torch.randn(ctx.index.shape[0], ctx.index.shape[1], DIM, dtype=torch.float64)
    y = module(x, ctx)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
        y_ref = module.proj(reference(module, q, k, v, ctx, x).flatten(2))
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-7)


# ----- every registered backend ---------------------------------------------------------------------
ATTENTION_NAMES = get_registry("attention").names()


def test_builtin_backends_are_registered():
    assert {"softmax", "glga"} <= set(ATTENTION_NAMES)


@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_backend_matches_reference(name, dropped):
    module = perturbed(get_registry("attention").create(name, DIM, HEADS))
    reference = REFERENCES.get(name)
    if reference is None:
        if not hasattr(module, "reference"):
            pytest.fail(f"attention '{name}' has no reference: add it to REFERENCES or define .reference()")
        reference = lambda m, *args: m.reference(*args)  # noqa: E731
    ctx = make_ctx(keep=30 if dropped else None)
    assert ctx.dropped == dropped
    check_against_reference(module, ctx, reference)


# ----- glga ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_per_head", [False, True])
@pytest.mark.parametrize("branches", ["gated", "sum", "linear", "window"])
def test_glga_options_match_reference(branches, gate_per_head):
    module = perturbed(
        GLGAttention(DIM, HEADS, window_frames=2, branches=branches, gate_per_head=gate_per_head)
    )
    check_against_reference(module, make_ctx(keep=40), glga_reference)


@pytest.mark.parametrize("gate_per_head", [False, True])
def test_glga_softmax_gate_matches_reference_and_its_gates_sum_to_one(gate_per_head):
    """gate_fn = 'softmax': the module, its own reference() and the reference here agree; the two
    gates of a token sum to 1; with the same weights the paper's sigmoid gate gives another output."""
    module = perturbed(
        GLGAttention(DIM, HEADS, window_frames=2, gate_fn="softmax", gate_per_head=gate_per_head)
    )
    ctx = make_ctx(keep=40)
    check_against_reference(module, ctx, glga_reference)
    torch.manual_seed(2)
    x = torch.randn(ctx.index.shape[0], ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
        torch.testing.assert_close(module.reference(q, k, v, ctx, x), glga_reference(module, q, k, v, ctx, x))
        g = torch.softmax(module.gate(x).unflatten(-1, (2, -1)), dim=2)
        torch.testing.assert_close(g.sum(dim=2), torch.ones_like(g[:, :, 0]))
        sigmoid = perturbed(GLGAttention(DIM, HEADS, window_frames=2, gate_per_head=gate_per_head))
        sigmoid.load_state_dict(module.state_dict())
        assert not torch.allclose(module.attend(q, k, v, ctx, x), sigmoid.attend(q, k, v, ctx, x))


def test_glga_on_kept_tokens_equals_dense_grid_without_dropped_keys():
    """Dropping tokens = the dense-grid operation with dropped tokens removed as keys (window on raster)."""
    module = perturbed(GLGAttention(DIM, HEADS, window_frames=2))
    dense, kept = make_ctx(), make_ctx(keep=30)
    torch.manual_seed(2)
    x_dense = torch.randn(BATCH, dense.num_tokens, DIM, dtype=torch.float64)
    x_kept = kept.gather(x_dense)
    y_kept = module(x_kept, kept)
    with torch.no_grad():  # the dense grid: every token's query, only kept tokens as keys
        q, k, v = module.project(x_dense, dense)
        is_kept = torch.zeros(BATCH, dense.num_tokens, dtype=torch.bool).scatter(1, kept.index, True)
        radius = window_radius(dense.grid, module.window_frames)
        o_local = dense_attention(q, k, v, window_mask(dense.index, radius) & is_kept[:, None, :])
        o_global = linear_attention_reference(q, k * is_kept[:, :, None, None], v)
        g = torch.sigmoid(module.gate(x_dense))[..., None, None]  # [B, N, 2, 1, 1]
        o = g[:, :, 0] * rms(o_global, module.norm_global.weight) + g[:, :, 1] * rms(
            o_local, module.norm_local.weight
        )
        y_dense = kept.gather(module.proj(o.flatten(2)))
    torch.testing.assert_close(y_kept, y_dense, atol=1e-9, rtol=1e-7)


def test_window_on_compacted_positions_would_be_wrong():
    """The invariant has teeth: a band over positions 0..M-1 of the kept tokens gives another result."""
    module = perturbed(GLGAttention(DIM, HEADS, window_frames=2, branches="window"))
    ctx = make_ctx(keep=30)
    radius = window_radius(ctx.grid, module.window_frames)
    compacted = torch.arange(30).expand(BATCH, 30)
    assert not torch.equal(window_mask(ctx.index, radius), window_mask(compacted, radius))
    torch.manual_seed(3)
    x = torch.randn(BATCH, 30, DIM, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
        y = module.attend(q, k, v, ctx, x)
        right = rms(dense_attention(q, k, v, window_mask(ctx.index, radius)), module.norm_local.weight)
        wrong = rms(dense_attention(q, k, v, window_mask(compacted, radius)), module.norm_local.weight)
    torch.testing.assert_close(y, right, atol=1e-9, rtol=1e-7)
    assert (y - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize("branches", ["gated", "sum", "linear", "window"])
def test_glga_flex_matches_reference_on_cpu(branches, dropped):
    reference = perturbed(GLGAttention(DIM, HEADS, window_frames=2, branches=branches, impl="reference"))
    flex = GLGAttention(DIM, HEADS, window_frames=2, branches=branches, impl="flex").double()
    flex.load_state_dict(reference.state_dict())
    ctx = make_ctx(keep=30 if dropped else None)
    torch.manual_seed(4)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():  # flex_attention has no backward on CPU
        torch.testing.assert_close(flex(x, ctx), reference(x, ctx), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("keep", [None, 40])
def test_flex_band_on_inputs_padded_to_the_block_equals_the_reference(keep):
    from eflow.plugins.attention.glga import local_attention_flex, local_attention_reference

    ctx = make_ctx(grid=(3, 7, 9), keep=keep)  # 189 or 40 tokens: not multiples of 128
    m = ctx.index.shape[1]
    q, k, v = (torch.randn(BATCH, m, HEADS, DIM // HEADS, dtype=torch.float64) for _ in range(3))
    expected = local_attention_reference(q, k, v, ctx.index, 30)
    padded = local_attention_flex(q, k, v, ctx.index, 30, pad_to_block=True)
    torch.testing.assert_close(padded, expected)


@pytest.mark.parametrize("linear_fp32", [True, False])
@pytest.mark.parametrize("keep", [None, 40])
def test_fused_gated_glga_of_the_cuda_path_equals_the_reference(keep, linear_fp32):
    """gated_glga (compiled as a whole on CUDA) run eagerly here, on inputs padded as attend_fused pads
    them; in fp64 the linear branch in the inputs' dtype (linear_fp32=False) is exact too."""
    from torch.nn.functional import pad

    from eflow.plugins.attention.glga import band_block_mask, gated_glga, window_radius

    module = perturbed(GLGAttention(DIM, HEADS, window_frames=2)).double()
    ctx = make_ctx(keep=keep)
    m = ctx.index.shape[1]
    x = torch.randn(BATCH, m, DIM, dtype=torch.float64)
    q, k, v = module.project(x, ctx)
    expected = module.reference(q, k, v, ctx, x)
    rows = (-m) % 128
    q, k, v = (pad(t.detach(), (0, 0, 0, 0, 0, rows)) for t in (q, k, v))  # flex: no CPU backward
    block_mask = band_block_mask(ctx.index, window_radius(ctx.grid, 2), pad_inputs=True)
    with warnings.catch_warnings(), torch.no_grad():  # the GPU tests cover gradients
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = gated_glga(
            q, k, v, pad(x, (0, 0, 0, rows)), block_mask, module.norm_global.weight,
            module.norm_local.weight, module.gate.weight, module.gate.bias, linear_fp32,
        )  # fmt: skip
    torch.testing.assert_close(out[:, :m], expected, atol=1e-5, rtol=1e-5)  # linear_fp32: that branch in fp32


def test_band_block_mask_is_built_once_per_token_context():
    """Every GLGA block of a forward shares its context's band mask; the next forward's context builds its own."""
    ctx = make_ctx(keep=30)
    first, second = (GLGAttention(DIM, HEADS, window_frames=2, impl="flex") for _ in range(2))
    x = torch.randn(BATCH, 30, DIM)
    with torch.no_grad():
        first(x, ctx), second(x, ctx)
    assert len(ctx.cache) == 1
    mask = first.band_mask(ctx, padded=False)
    assert second.band_mask(ctx, padded=False) is mask
    wider = GLGAttention(DIM, HEADS, window_frames=3)  # another radius, another mask
    assert wider.band_mask(ctx, padded=False) is not mask
    assert first.band_mask(make_ctx(keep=30), padded=False) is not mask


def test_the_fp32_linear_branch_stays_fp32_under_bf16_autocast():
    """linear_precision = 'fp32' (no longer GLGA's default): fp32 products whatever autocast says."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 512, 2, 16).bfloat16() for _ in range(3))
    exact = linear_attention_reference(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v, "fp32")
        bf16 = torch.einsum("bmhd,bhde->bmhe", q, torch.einsum("bmhd,bmhe->bhde", k, v))
    assert out.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16  # what autocast would have done without the guard
    assert rel_err(out, exact) < 1e-5 < rel_err(bf16, exact)


def test_linear_branch_in_the_inputs_dtype_is_bf16_and_within_bf16_rounding():
    """linear_precision = 'input': bf16 in, bf16 out (fp32 accumulation inside the matmuls), its error
    against fp64 that of bf16 rounding, larger than the fp32 branch's."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 512, 2, 16).bfloat16() for _ in range(3))
    exact = linear_attention_reference(q.double(), k.double(), v.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v, "input")
        fp32 = linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert rel_err(fp32, exact) < 1e-5 < rel_err(out, exact) < 2e-2


def test_glga_with_the_linear_branch_in_bf16_stays_close_to_fp32():
    """The module's default: exact in fp64 (the reference), within bf16 rounding of the fp32 branch
    under bf16 autocast (after the RMSNorm, which both run in fp32)."""
    module = perturbed(GLGAttention(DIM, HEADS, window_frames=2, linear_precision="input"))
    check_against_reference(module, make_ctx(keep=40), glga_reference)
    fast = GLGAttention(DIM, HEADS)  # the default since 2026-12-01
    exact = GLGAttention(DIM, HEADS, linear_precision="fp32")
    exact.load_state_dict(fast.state_dict())
    ctx, x = make_ctx(keep=30), torch.randn(BATCH, 30, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y_fast, y_exact = fast(x, ctx), exact(x, ctx)
    assert "bfloat16 einsum" in fast.kernel(torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16))
    assert 0 < rel_err(y_fast, y_exact) < 2e-2


def test_glga_runs_under_bf16_autocast():
    module = GLGAttention(DIM, HEADS)
    ctx = make_ctx(keep=30)
    x = torch.randn(BATCH, 30, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, ctx)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, module(x, ctx)) < 2e-2


def test_glga_options():
    entry = get_registry("attention").get("glga")
    assert GLGAOptions().window_frames == 4
    assert entry.create(DIM, HEADS, options={"window_frames": 6}).window_frames == 6
    assert entry.create(DIM, HEADS, options={"gate_per_head": True}).gate.out_features == 2 * HEADS
    assert entry.create(DIM, HEADS, options={"branches": "linear"}).gate is None
    with pytest.raises(Exception, match="window_frame"):
        entry.create(DIM, HEADS, options={"window_frame": 6})
    with pytest.raises(Exception, match="branches"):
        entry.create(DIM, HEADS, options={"branches": "both"})
    assert window_radius((21, 30, 52), 6) == 4680


def test_glga_gate_init_zero_starts_every_gate_at_one_half_inside_the_model():
    """The model's xavier init runs first; gate_init = 'zero' restores W_g = 0 (init_weights), so
    sigmoid(X W_g) = 0.5 for any input; the default keeps xavier's input-dependent gates."""
    from eflow.model.dit import build_model

    torch.manual_seed(0)
    zero = build_model("tiny", attention="glga", attention_options={"gate_init": "zero"})
    default = build_model("tiny", attention="glga")
    gates = [m.gate for m in zero.modules() if isinstance(m, GLGAttention)]
    assert gates and all(g.weight.abs().sum() == 0 and g.bias.abs().sum() == 0 for g in gates)
    x = torch.randn(2, 5, gates[0].in_features)
    assert torch.equal(torch.sigmoid(gates[0](x)), torch.full((2, 5, 2), 0.5))
    assert all(m.gate.weight.abs().sum() > 0 for m in default.modules() if isinstance(m, GLGAttention))


# ----- GPU: compiled flex vs the reference -----------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "gate_fn, linear_precision",
    [("sigmoid", "fp32"), ("softmax", "fp32"), ("sigmoid", "input"), ("softmax", "input")],
)  # fused gated_glga / the unfused CUDA path, the linear branch in fp32 / in the inputs' dtype
def test_glga_compiled_flex_matches_reference_on_cuda(dtype, gate_fn, linear_precision):
    grid, dim, heads = (8, 16, 16), 256, 4  # N = 2048; 75% dropped -> M = 512; radius 512
    ctx = make_ctx(grid, batch=2, keep=512, head_dim=dim // heads, device="cuda")
    torch.manual_seed(6)
    # the reference keeps the fp32 linear branch whatever the default: the bf16 branch is measured against it
    reference = GLGAttention(dim, heads, gate_fn=gate_fn, impl="reference", linear_precision="fp32").cuda()
    flex = GLGAttention(dim, heads, gate_fn=gate_fn, impl="flex", linear_precision=linear_precision).cuda()
    flex.load_state_dict(reference.state_dict())
    x = torch.randn(2, 512, dim, device="cuda")
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    outputs, grads = outputs_and_input_grads((flex, reference), x, ctx, dtype)  # through the compiled kernels
    assert rel_err(outputs[0], outputs[1]) < tol
    assert rel_err(grads[0], grads[1]) < tol
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        q, k, v = reference.project(x, ctx)
        radius = window_radius(grid, 4)
        band = local_attention_flex(q, k, v, ctx.index, radius)
    exact = dense_attention(q.double(), k.double(), v.double(), window_mask(ctx.index, radius))
    assert band.dtype == q.dtype
    assert rel_err(band, exact) < tol


@contextlib.contextmanager
def dynamo_reset_after():
    """Drop what was compiled inside (Inductor settings are not guards: a later call would reuse it)."""
    try:
        yield
    finally:
        torch._dynamo.reset()


def unfused_gated_glga(module: GLGAttention, q, k, v, ctx, x):
    """Eqs. (5)-(8) from the module's separate branches and an eager gate: no Inductor graph around
    the norms and the gate (only the band is compiled flex)."""
    o_global, o_local = module.global_branch(q, k, v), module.local_branch(q, k, v, ctx)
    g = torch.sigmoid(module.gate(x)).unflatten(-1, (2, -1))[..., None]
    return g[:, :, 0] * o_global + g[:, :, 1] * o_local


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("batch, keep", [(1, None), (2, None), (1, 8190)])  # 8,190: 75% dropped
def test_fused_gated_glga_gradients_at_480p_match_the_unfused_branches(batch, keep):
    """The fused CUDA graph at XL's size (21 x 30 x 52 tokens, 16 heads x 72), one sample and two, with
    Inductor's default settings (mix-order reduction on, as eager training runs it), under bf16
    autocast as XL trains: its output and every gradient (q, k, v, x, both norms' weights, the gate)
    against the unfused branches, within bf16 rounding (the failures this guards against were 1e5x).
    Reductions of this size are where compiled XL blocks went wrong (docs/scaling.md); the small-grid
    tests above do not reach them."""
    import torch._inductor.config

    if not hasattr(torch._inductor.config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    grid, dim, heads = (21, 30, 52), 1152, 16
    ctx = make_ctx(grid, batch=batch, keep=keep, head_dim=dim // heads, device="cuda")
    torch.manual_seed(7)
    module = perturbed(GLGAttention(dim, heads, window_frames=4, impl="flex"), scale=0.05).float().cuda()
    m = ctx.index.shape[1]
    inputs = [torch.randn(batch, m, heads, dim // heads, device="cuda") for _ in range(3)]
    inputs.append(torch.randn(batch, m, dim, device="cuda"))
    results = []
    torch._dynamo.reset()  # gated_glga compiled here, under the setting below, and dropped after
    with torch._inductor.config.patch({"triton.mix_order_reduction": True}), dynamo_reset_after():
        for attend in (module.attend, lambda q, k, v, c, x: unfused_gated_glga(module, q, k, v, c, x)):
            module.zero_grad(set_to_none=True)
            leaves = [t.clone().requires_grad_() for t in inputs]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = attend(*(t.bfloat16() for t in leaves[:3]), ctx, leaves[3]).float()
            out.square().mean().backward()
            params = [
                module.norm_global.weight,
                module.norm_local.weight,
                module.gate.weight,
                module.gate.bias,
            ]
            results.append([out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params])
    names = ["output", "q", "k", "v", "x", "norm_global", "norm_local", "gate.weight", "gate.bias"]
    for name, fused, unfused in zip(names, *results, strict=True):
        assert rel_err(fused, unfused) < 3e-2, (name, rel_err(fused, unfused))


@pytest.mark.gpu
@cuda
def test_glga_compiled_flex_runs_at_480p_without_n_by_n():
    grid, dim, heads = (21, 30, 52), 1536, 12  # N = 32,760 dense; 6-frame window, radius 4680
    ctx = make_ctx(grid, batch=1, head_dim=dim // heads, device="cuda")
    module = GLGAttention(dim, heads, window_frames=6, impl="flex").cuda()
    n = ctx.num_tokens
    x = torch.randn(1, n, dim, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    q, k, v = (torch.randn(1, n, heads, dim // heads, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    index = ctx.index.clone()  # a fresh index: the block mask is built (compiled) inside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    band = local_attention_flex(q, k, v, index, window_radius(grid, 6))
    torch.cuda.synchronize()
    assert torch.isfinite(band).all()
    # [B, H, M, d] copies of q, k, v plus the output: ~400 MB; an N x N bool mask alone would be 1 GiB
    assert torch.cuda.max_memory_allocated() - base < n * n // 2


@pytest.mark.gpu
@cuda
def test_glga_compiled_flex_handles_many_shapes_without_falling_back_to_n_by_n():
    """Objectives call the model with varying batch and kept-token counts; compiled flex must stay
    correct and never fall back to a path that materializes [B, H, M, M] scores (seen as an OOM)."""
    heads, d, grid = 4, 64, (16, 32, 32)  # N = 16,384
    n = grid[0] * grid[1] * grid[2]
    radius = window_radius(grid, 4)
    for i, (batch, m) in enumerate([(1, 4096), (3, 4096), (2, 4000), (5, 4096), (4, n), (7, 4096), (6, 3900),
                                    (9, 4096), (8, 4100), (10, 4096), (11, 2048), (2, n)]):  # fmt: skip
        g = torch.Generator().manual_seed(i)
        index = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(batch)]).cuda()
        q, k, v = (torch.randn(batch, m, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = local_attention_flex(q, k, v, index, radius)
        torch.cuda.synchronize()
        scores = batch * heads * m * m * 2  # what a dense bf16 score tensor would take
        assert torch.cuda.max_memory_allocated() - base < scores / 4, (batch, m)
        if i % 4 == 0:
            exact = dense_attention(
                q[:1].double(), k[:1].double(), v[:1].double(), window_mask(index[:1], radius)
            )
            assert rel_err(out[:1], exact) < 2e-2, (batch, m)


@pytest.mark.parametrize("m, radius, block", [(200, 9, 16), (256, 40, 32), (97, 0, 16), (300, 1000, 64)])
def test_band_block_table_covers_the_band_exactly(m, radius, block):
    """Every in-band pair lies in a listed block; full blocks hold only in-band pairs; no block is listed twice."""
    from eflow.plugins.attention.glga import band_block_mask

    g = torch.Generator().manual_seed(m + radius)
    index = torch.stack([torch.randperm(4 * m, generator=g)[:m].sort().values for _ in range(2)])
    bm = band_block_mask(index, radius, block=block)
    nb = -(-m // block)
    band = (index[:, :, None] - index[:, None, :]).abs() <= radius  # [B, M, M] ground truth
    padded = torch.zeros(2, nb * block, nb * block, dtype=torch.bool)
    padded[:, :m, :m] = band
    per_block = padded.view(2, nb, block, nb, block)
    any_in = per_block.any(dim=(2, 4))  # [B, QB, KB]
    real_pairs = real_block_pairs(m, nb, block)
    all_in = per_block.all(dim=(2, 4)) & real_pairs
    listed, full = listed_blocks(bm, 2, nb)
    assert listed.max() <= 1
    assert torch.equal(listed.bool(), any_in)  # covers the band, lists nothing outside it
    assert not (full & ~all_in).any()  # a full block skips the mask_mod, so it must be entirely in band
