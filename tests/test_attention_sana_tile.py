"""The sana and tile attention backends, and Sana's Mix-FFN, against brute-force references.

Each backend's `attend` is checked in float64 against a reference written here from the equations
(explicit rotations, explicit per-query key sets), with and without dropped tokens; the Mix-FFN against
explicit "zero the dropped places, conv on the dense grid, gather" computations; tiny models built with
each backend train with and without token dropping. GPU tests compare the fast paths in bf16 and fp32.
"""

from __future__ import annotations

import math

import attention_inputs
import pytest
import torch
import torch.nn.functional as F
from attention_inputs import listed_blocks, perturbed, real_block_pairs, rel_err
from off_init import perturb

from eflow.condition import Condition
from eflow.errors import ConfigError
from eflow.model.attention_reference import dense_attention
from eflow.model.blocks import DiTBlock
from eflow.model.dit import build_model
from eflow.model.mix_ffn import MixFFN
from eflow.model.tokens import TokenContext
from eflow.plugins.attention.sana import SanaAttention, SanaOptions, relu_linear_attention
from eflow.plugins.attention.tile import TileAttention, TileOptions, tile_block_mask, tile_mask
from eflow.registry import get_registry

GRID = (6, 3, 4)  # N = 72, 12 tokens per frame
DIM, HEADS, BATCH = 32, 2, 2


def make_ctx(grid=GRID, batch=BATCH, keep=None, head_dim=DIM // HEADS, seed=0, device="cpu"):
    return attention_inputs.make_ctx(grid, batch, keep, head_dim, seed, device)


def qkv(ctx, seed=1, dim=DIM, heads=HEADS, dtype=torch.float64):
    """Random q, k, v [B, M, H, d]."""
    g = torch.Generator().manual_seed(seed)
    shape = (ctx.index.shape[0], ctx.index.shape[1], heads, dim // heads)
    return (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))


# ----- brute-force references ------------------------------------------------------------------------
def rotate(x, angles):
    """RoPE in fp64 written as 2 x 2 rotations of the channel pairs: x [B, M, H, d], angles [B, M, d/2]."""
    out = torch.empty_like(x)
    cos, sin = angles.double().cos()[:, :, None], angles.double().sin()[:, :, None]  # [B, M, 1, d/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = cos * even - sin * odd
    out[..., 1::2] = sin * even + cos * odd
    return out


def sana_bruteforce(q, k, v, angles, eps):
    """o_i = sum_j [R(phi q_i) . R(phi k_j)] v_j / (phi q_i . sum_j phi k_j + eps), one query at a time."""
    phi_q, phi_k = q.relu(), k.relu()
    rot_q, rot_k = rotate(phi_q, angles), rotate(phi_k, angles)
    out = torch.zeros_like(v)
    b, m, h, _ = q.shape
    for bi in range(b):
        for hi in range(h):
            key_sum = phi_k[bi, :, hi].sum(0)  # [d]
            for i in range(m):
                weights = (rot_k[bi, :, hi] * rot_q[bi, i, hi]).sum(-1)  # [M]
                denominator = (phi_q[bi, i, hi] * key_sum).sum() + eps
                out[bi, i, hi] = (weights[:, None] * v[bi, :, hi]).sum(0) / denominator
    return out


def tile_bruteforce(q, k, v, index, grid, reference_frames, frame_window):
    """Softmax of each query over the keys listed frame by frame: its frame +- window, the first R frames."""
    per_frame = grid[1] * grid[2]
    out = torch.zeros_like(v)
    b, m, h, d = q.shape
    for bi in range(b):
        frames = [int(n) // per_frame for n in index[bi]]
        for i in range(m):
            keys = [
                j
                for j in range(m)
                if abs(frames[i] - frames[j]) <= frame_window or frames[j] < reference_frames
            ]
            for hi in range(h):
                scores = torch.stack([(q[bi, i, hi] * k[bi, j, hi]).sum() for j in keys]) / math.sqrt(d)
                weights = scores.softmax(0)
                out[bi, i, hi] = (weights[:, None] * v[bi, keys, hi]).sum(0)
    return out


# ----- sana: attention -------------------------------------------------------------------------------
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_sana_attend_matches_bruteforce(dropped):
    module = perturbed(SanaAttention(DIM, HEADS))
    ctx = make_ctx(keep=30 if dropped else None)
    q, k, v = qkv(ctx)
    out = module.attend(q, k, v, ctx, None)
    assert out.dtype == torch.float64
    exact = sana_bruteforce(q, k, v, ctx.rope, module.eps)
    assert rel_err(out, exact) < 1e-6  # apply_rope rotates in fp32
    torch.testing.assert_close(module.reference(q, k, v, ctx, None), out, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_sana_forward_passes_unrotated_qk_and_matches_reference(dropped):
    module = perturbed(SanaAttention(DIM, HEADS))
    ctx = make_ctx(keep=30 if dropped else None)
    torch.manual_seed(2)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
        q_unrotated = module.norm_q(module.qkv(x).chunk(3, dim=-1)[0])  # rotate_qk = False: no RoPE yet
        torch.testing.assert_close(q.flatten(2), q_unrotated)
        expected = module.proj(sana_bruteforce(q, k, v, ctx.rope, module.eps).flatten(2))
    assert rel_err(module(x, ctx), expected) < 1e-6


def test_sana_rows_sum_to_one_without_rotation_and_not_with_it():
    """With zero RoPE angles the numerator and denominator weights agree: each row of the implied
    attention matrix sums to 1, so constant values pass through unchanged. RoPE only rotates the numerator."""
    module = SanaAttention(DIM, HEADS).double()
    ctx = make_ctx(keep=40)
    q, k, _ = qkv(ctx)
    ones = torch.ones_like(q)
    still = TokenContext(ctx.grid, ctx.index, torch.zeros_like(ctx.rope), ctx.dropped)
    row_sums = module.attend(q, k, ones, still, None)
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-7, rtol=0)
    assert (module.attend(q, k, ones, ctx, None) - 1).abs().max() > 1e-2
    v = torch.randn_like(q)
    attention = module.attend(q, k, v, still, None)  # a convex combination of the values, per channel
    assert (attention <= v.max(1, keepdim=True).values + 1e-9).all()
    assert (attention >= v.min(1, keepdim=True).values - 1e-9).all()


def test_sana_eps_sets_the_output_of_a_query_with_no_positive_feature():
    module = SanaAttention(DIM, HEADS, eps=1e-8).double()
    ctx = make_ctx()
    q, k, v = qkv(ctx)
    q[:, 5] = -q[:, 5].abs()  # phi(q_5) = 0: numerator 0, denominator eps
    out = module.attend(q, k, v, ctx, None)
    assert torch.isfinite(out).all() and torch.equal(out[:, 5], torch.zeros_like(out[:, 5]))


def test_sana_linear_attention_is_fp32_under_bf16_autocast():
    ctx = make_ctx(grid=(4, 8, 16), batch=1, head_dim=16)
    q, k, v = (t.bfloat16() for t in qkv(ctx, dim=32, dtype=torch.float32))
    exact = sana_bruteforce(q.double(), k.double(), v.double(), ctx.rope, 1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relu_linear_attention(q, k, v, ctx.rope, 1e-8)
        module = SanaAttention(32, 2)
        cast = module.attend(q, k, v, ctx, None)
    assert out.dtype == torch.float32 and cast.dtype == torch.bfloat16
    assert rel_err(out, exact) < 1e-5


def test_sana_flops_count_the_d_by_d_products_and_the_normalizer():
    module = SanaAttention(DIM, HEADS)
    d, m = DIM // HEADS, 30
    assert module.flops(make_ctx(keep=m), batch=3) == 3 * HEADS * (4 * m * d * d + 4 * m * d)
    assert module.kernel(torch.zeros(1, m, HEADS, d)).startswith("fp32 einsum ReLU linear attention (RoPE")


# ----- sana: Mix-FFN ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temporal", ["depthwise", "full", "none"])
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_mix_ffn_matches_its_explicit_reference(temporal, dropped):
    ffn = perturbed(MixFFN(DIM, 24, temporal_conv=temporal))
    ctx = make_ctx(keep=30 if dropped else None)
    torch.manual_seed(3)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    y = ffn(x, ctx)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ffn.reference(x, ctx), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("temporal", ["depthwise", "full"])
def test_mix_ffn_with_dropped_tokens_is_scatter_zeros_conv_gather(temporal):
    """On kept tokens the FFN equals the dense-grid FFN whose conv inputs are zero at dropped places
    (written here with masks and F.conv3d), and differs from the dense FFN: dropping changes kept tokens."""
    ffn = perturbed(MixFFN(DIM, 24, temporal_conv=temporal))
    dense, kept = make_ctx(), make_ctx(keep=30)
    t, h, w = GRID
    torch.manual_seed(4)
    x = torch.randn(BATCH, dense.num_tokens, DIM, dtype=torch.float64)
    is_kept = torch.zeros(BATCH, dense.num_tokens, 1, dtype=torch.float64).scatter(
        1, kept.index[..., None], 1.0
    )

    def conv3d(u, weight, bias, groups):  # [B, N, C] -> [B, N, C'] on the (T', H', W') grid, zero padding
        volume = u.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)  # [B, C, T', H', W']
        padding = [size // 2 for size in weight.shape[2:]]
        out = F.conv3d(volume, weight, bias, padding=padding, groups=groups)
        return out.permute(0, 2, 3, 4, 1).flatten(1, 3)

    with torch.no_grad():
        spatial = ffn.spatial_conv.weight[:, :, None]  # [2h, 1, 1, 3, 3]
        u = conv3d(F.silu(ffn.fc1(x)) * is_kept, spatial, ffn.spatial_conv.bias, groups=48)
        value, gate = u.chunk(2, -1)
        y = ffn.fc2(value * F.silu(gate))
        groups = DIM if temporal == "depthwise" else 1
        y = y + conv3d(
            y * is_kept, ffn.temporal_conv.weight[..., None], None, groups
        )  # [D, D/groups, 3, 1, 1]
        expected = kept.gather(y)
        got = ffn(kept.gather(x), kept)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    assert (got - kept.gather(ffn(x, dense))).abs().max() > 1e-2


def test_mix_ffn_starts_as_the_image_mix_ffn_and_sizes_its_layers():
    torch.manual_seed(5)
    video = MixFFN(DIM, 24)  # depthwise temporal conv, zero at init
    image = MixFFN(DIM, 24, temporal_conv="none")
    image.load_state_dict({k: v for k, v in video.state_dict().items() if not k.startswith("temporal")})
    assert torch.equal(video.temporal_conv.weight, torch.zeros_like(video.temporal_conv.weight))
    ctx = make_ctx(keep=30)
    x = torch.randn(BATCH, 30, DIM)
    torch.testing.assert_close(video(x, ctx), image(x, ctx))
    assert video.fc1.out_features == 48 and video.fc2.in_features == 24 and video.fc2.bias is None
    assert video.spatial_conv.kernel_size == (3, 3) and video.spatial_conv.groups == 48
    assert video.temporal_conv.kernel_size == (3, 1) and video.temporal_conv.groups == DIM
    assert MixFFN(DIM, 24, temporal_conv="full").temporal_conv.weight.shape == (DIM, DIM, 3, 1)
    with pytest.raises(ValueError, match="ctx"):
        video(x)


def test_sana_blocks_use_mix_ffn_of_the_block_width_or_mlp_ratio():
    block = DiTBlock(DIM, 64, SanaAttention(DIM, HEADS), HEADS)
    assert isinstance(block.ffn, MixFFN) and block.ffn.hidden == 64
    entry = get_registry("attention").get("sana")
    sized = entry.create(DIM, HEADS, options={"mlp_ratio": 2.5, "temporal_conv": "none", "spatial_kernel": 5})
    ffn = sized.feed_forward(DIM, 64)
    assert ffn.hidden == 80 and ffn.temporal_conv is None and ffn.spatial_conv.kernel_size == (5, 5)
    model = build_model("tiny", overrides={"patch": (1, 2, 2)}, attention="sana")
    sana_blocks = [b for b in model.blocks() if isinstance(b.attn, SanaAttention)]
    assert sana_blocks and all(isinstance(b.ffn, MixFFN) for b in sana_blocks)
    assert all(b.ffn.temporal_conv.weight.abs().max() == 0 for b in sana_blocks)  # model init keeps it zero


def test_xl_sana_parameter_count_is_near_table2():
    """Mix-FFN at h = ffn_dim adds D h (the GLU's second half) + 21 h (depthwise 3x3 + bias) + 2 D per block."""
    with torch.device("meta"):
        softmax = build_model("XL", attention="softmax")
        sana = build_model("XL", attention="sana")
    d, h = softmax.spec.dim, softmax.spec.ffn_dim
    n_sana = sum(isinstance(b.attn, SanaAttention) for b in sana.blocks())
    total, base = sana.parameter_counts()["total"], softmax.parameter_counts()["total"]
    assert total - base == n_sana * (d * h + 21 * h + 2 * d)
    print(
        f"XL sana {total / 1e6:.1f}M with {n_sana} sana blocks (EFlow Table 2: 607M), softmax {base / 1e6:.1f}M"
    )
    assert abs(total - 607e6) / 607e6 < 0.03


# ----- tile ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference_frames, frame_window", [(1, 0), (2, 1), (0, 0), (1, 2)])
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_tile_matches_bruteforce(reference_frames, frame_window, dropped):
    module = perturbed(TileAttention(DIM, HEADS, reference_frames, frame_window, impl="reference"))
    ctx = make_ctx(keep=30 if dropped else None)
    q, k, v = qkv(ctx)
    exact = tile_bruteforce(q, k, v, ctx.index, GRID, reference_frames, frame_window)
    torch.testing.assert_close(module.attend(q, k, v, ctx, None), exact, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(module.reference(q, k, v, ctx, None), exact, atol=1e-10, rtol=1e-8)


def test_tile_restricts_attention_to_the_tile_pattern():
    """Changing a key outside a query's tiles leaves it alone; changing one in a reference frame does not."""
    module = TileAttention(DIM, HEADS, reference_frames=1, impl="reference").double()
    ctx = make_ctx()
    q, k, v = qkv(ctx)
    out = module.attend(q, k, v, ctx, None)
    per_frame = ctx.tokens_per_frame
    v2 = v.clone()
    v2[:, 3 * per_frame] += 1.0  # a token of frame 3
    out2 = module.attend(q, k, v2, ctx, None)
    changed = (out2 - out).abs().amax(dim=(0, 2, 3)) > 0  # [M]
    assert torch.equal(changed.nonzero().flatten(), torch.arange(3 * per_frame, 4 * per_frame))
    v3 = v.clone()
    v3[:, 0] += 1.0  # a token of the reference frame 0 reaches every query
    assert ((module.attend(q, k, v3, ctx, None) - out).abs().amax(dim=(0, 2, 3)) > 0).all()


@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_tile_covering_every_frame_is_dense_softmax(dropped):
    ctx = make_ctx(keep=30 if dropped else None)
    q, k, v = qkv(ctx)
    dense = dense_attention(q, k, v)
    for module in (
        TileAttention(DIM, HEADS, reference_frames=GRID[0]),
        TileAttention(DIM, HEADS, 0, GRID[0] - 1),
    ):
        torch.testing.assert_close(module.double().attend(q, k, v, ctx, None), dense, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("reference_frames, frame_window", [(1, 0), (2, 1), (0, 0)])
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_tile_flex_matches_reference_on_cpu(reference_frames, frame_window, dropped):
    grid = (5, 8, 8)  # N = 320 > one 128-token block, so the block table matters
    ctx = make_ctx(grid, keep=200 if dropped else None)
    reference = perturbed(TileAttention(DIM, HEADS, reference_frames, frame_window, impl="reference"))
    flex = TileAttention(DIM, HEADS, reference_frames, frame_window, impl="flex").double()
    flex.load_state_dict(reference.state_dict())
    torch.manual_seed(6)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():  # flex_attention has no backward on CPU
        torch.testing.assert_close(flex(x, ctx), reference(x, ctx), atol=1e-10, rtol=1e-8)
    assert flex.kernel(x) == "flex_attention frame tiles (eager)"


@pytest.mark.parametrize(
    "m, reference_frames, frame_window, block", [(200, 1, 0, 16), (256, 2, 1, 32), (97, 0, 0, 16)]
)
def test_tile_block_table_covers_the_mask(m, reference_frames, frame_window, block):
    """Every allowed pair lies in a listed block; full blocks hold only allowed pairs; none listed twice."""
    per_frame = 12 * block  # about 3 blocks of kept tokens per frame: full and partial blocks both occur
    g = torch.Generator().manual_seed(m)
    index = torch.stack([torch.randperm(4 * m, generator=g)[:m].sort().values for _ in range(2)])
    bm = tile_block_mask(index, per_frame, reference_frames, frame_window, block=block)
    nb = -(-m // block)
    allowed = torch.zeros(2, nb * block, nb * block, dtype=torch.bool)
    allowed[:, :m, :m] = tile_mask(index, per_frame, reference_frames, frame_window)
    per_block = allowed.view(2, nb, block, nb, block)
    real_pairs = real_block_pairs(m, nb, block)
    listed, full = listed_blocks(bm, 2, nb)
    assert listed.max() <= 1
    assert not (per_block.any(dim=(2, 4)) & ~listed.bool()).any()  # every allowed pair is covered
    assert not (full & ~(per_block.all(dim=(2, 4)) & real_pairs)).any()  # full blocks skip the mask_mod
    assert full.any() and (listed.bool() & ~full).any()


def test_tile_block_mask_is_built_once_per_token_context():
    """Every tile block of a forward shares its context's block mask; another pattern builds its own."""
    ctx = make_ctx((5, 8, 8), keep=200)
    first, second = (TileAttention(DIM, HEADS, 1, 0, impl="flex") for _ in range(2))
    x = torch.randn(BATCH, 200, DIM)
    with torch.no_grad():
        first(x, ctx), second(x, ctx)
        assert len(ctx.cache) == 1
        TileAttention(DIM, HEADS, 2, 0, impl="flex")(x, ctx)
    assert len(ctx.cache) == 2
    assert not make_ctx((5, 8, 8), keep=200).cache  # the next forward's context starts empty


def test_tile_flops_count_the_allowed_pairs():
    module = TileAttention(DIM, HEADS, reference_frames=2, frame_window=1)
    ctx = make_ctx(keep=30)
    pairs = int(tile_mask(ctx.index, ctx.tokens_per_frame, 2, 1).sum())
    assert module.flops(ctx, batch=BATCH) == 4 * HEADS * (DIM // HEADS) * pairs
    assert module.flops(ctx, batch=1) == 2 * HEADS * (DIM // HEADS) * pairs  # per-sample average
    assert module.kernel(torch.zeros(1, 30, HEADS, DIM // HEADS)) == "SDPA with an M x M frame-tile mask"


# ----- both: options, registry, a tiny model ---------------------------------------------------------
def test_options_defaults_and_errors():
    assert SanaOptions().eps == 1e-8 and SanaOptions().temporal_conv == "depthwise"
    assert TileOptions().reference_frames == 1 and TileOptions().frame_window == 0
    registry = get_registry("attention")
    assert registry.create("tile", DIM, HEADS, options={"reference_frames": 3}).reference_frames == 3
    assert registry.create("sana", DIM, HEADS, options={"eps": 1e-6}).eps == 1e-6
    for name, options, field in [
        ("sana", {"epsilon": 1e-6}, "epsilon"),
        ("sana", {"eps": 0}, "eps"),
        ("sana", {"spatial_kernel": 4}, "spatial_kernel"),
        ("sana", {"temporal_conv": "causal"}, "temporal_conv"),
        ("tile", {"reference_frame": 1}, "reference_frame"),
        ("tile", {"frame_window": -1}, "frame_window"),
        ("tile", {"impl": "triton"}, "impl"),
    ]:
        with pytest.raises(ConfigError, match=field):
            registry.create(name, DIM, HEADS, options=options)
    with pytest.raises(ValueError, match="odd"):
        MixFFN(DIM, 8, temporal_kernel=2)


@pytest.mark.parametrize("attention", ["sana", "tile"])
def test_tiny_model_trains_with_and_without_dropping_and_every_parameter_learns(attention):
    torch.manual_seed(0)
    model = build_model("tiny", overrides={"patch": (1, 2, 2)}, attention=attention)  # grid (4, 4, 4)
    with torch.no_grad():  # move every AdaLN-Zero gate and zero-init conv off zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.4])
    labels = torch.tensor([3, 1])
    keep = (
        get_registry("token_drop")
        .create("sprint")
        .select((4, 4, 4), 2, 0.75, torch.Generator().manual_seed(0))
    )
    for kwargs in ({}, {"keep": keep}):
        model.zero_grad()
        out = model(x, t, t * 0.5, Condition(labels=labels), guidance=3.0, **kwargs)
        assert out.shape == x.shape and torch.isfinite(out).all()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing


def test_sana_model_runs_under_bf16_autocast_with_dropping():
    torch.manual_seed(0)
    model = build_model("tiny", overrides={"patch": (1, 2, 2)}, attention="sana")
    perturb(model)  # off AdaLN-Zero's start: at init the output and every block's gradient are zero
    x = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([0.9, 0.4])
    keep = (
        get_registry("token_drop")
        .create("sprint")
        .select((4, 4, 4), 2, 0.5, torch.Generator().manual_seed(0))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, t * 0.5, Condition(labels=torch.tensor([1, 2])), keep=keep)
        ffn_out = model.middle[0].ffn(torch.randn(2, 32, 96), make_ctx((4, 4, 4), keep=32, head_dim=24))
    assert out.dtype == ffn_out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert out.float().abs().mean() > 0.01
    out.float().square().mean().backward()
    grad = model.middle[0].ffn.temporal_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


# ----- GPU: fast paths vs the references -------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _forward_and_input_grad(module, x, ctx, use_reference, dtype=None):
    """y = proj(attend or reference) and dL/dx for L = sum(y^2), under bf16 autocast when dtype is bf16."""
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if use_reference:
            q, k, v = module.project(x, ctx)
            y = module.proj(module.reference(q, k, v, ctx, x).flatten(2))
        else:
            y = module(x, ctx)
    y.float().square().sum().backward()
    return y, x.grad


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sana", "tile"])
def test_fast_path_matches_reference_on_cuda(attention, dtype, dropped):
    grid, dim, heads = (8, 16, 16), 256, 4  # N = 2048; dropped: M = 512
    ctx = make_ctx(grid, keep=512 if dropped else None, head_dim=dim // heads, device="cuda")
    torch.manual_seed(7)
    options = {"impl": "flex", "reference_frames": 1, "frame_window": 1} if attention == "tile" else {}
    module = get_registry("attention").create(attention, dim, heads, options=options).cuda()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(BATCH, ctx.index.shape[1], dim, device="cuda")
    y, grad = _forward_and_input_grad(module, x, ctx, use_reference=False, dtype=dtype)
    y_ref, grad_ref = _forward_and_input_grad(module.double(), x.double(), ctx, use_reference=True)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    assert rel_err(grad, grad_ref) < tol
    if attention == "tile":
        assert module.kernel(x) == "flex_attention frame tiles (compiled)"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mix_ffn_on_cuda_matches_reference(dtype):
    grid, dim = (4, 8, 8), 64
    ctx = make_ctx(grid, keep=150, head_dim=16, device="cuda")
    ffn = perturbed(MixFFN(dim, 96, temporal_conv="full")).float().cuda()
    x = torch.randn(BATCH, 150, dim, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = ffn(x, ctx)
    exact = ffn.double().reference(x.double(), ctx)
    assert rel_err(y, exact) < (1e-3 if dtype == torch.float32 else 3e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attention", ["sana", "tile"])
def test_attention_runs_at_480p_without_m_by_m(attention):
    grid, heads, d = (21, 30, 52), 12, 128  # N = 32,760
    ctx = make_ctx(grid, batch=1, head_dim=d, device="cuda")
    module = get_registry("attention").create(attention, heads * d, heads).cuda()
    n = ctx.num_tokens
    q, k, v = (
        torch.randn(1, n, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    fresh = TokenContext(
        ctx.grid, ctx.index.clone(), ctx.rope, ctx.dropped
    )  # tile builds its block mask inside
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = module.attend(q, k, v, fresh, None)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    scores = n * n * heads * 2  # one bf16 [H, M, M] score tensor: 25.8 GB
    print(
        f"{attention}: peak {peak / 2**20:.0f} MiB over the inputs (bf16 scores would take {scores / 2**30:.1f} GiB)"
    )
    assert peak < scores / 8
