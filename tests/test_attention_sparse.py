"""SLA and VSA against brute-force references written out here, plus their flex paths, options and the model.

The brute-force references share no code with the plugins: they pool, pick the top-k blocks or tiles and
build the full [M, M] selection mask with Python loops, then run a dense masked softmax and (SLA) the
closed-form linear part phi(q) (S_total - S_sel) / (phi(q) (z_total - z_sel) + eps).
"""

from __future__ import annotations

import math

import attention_inputs
import pytest
import torch
import torch.nn.functional as F
from attention_inputs import outputs_and_input_grads, perturbed, rel_err

from eflow.condition import Condition
from eflow.model.attention_reference import dense_attention
from eflow.model.dit import build_model
from eflow.model.tokens import TokenContext
from eflow.plugins.attention.sla import (
    LINEAR_EPS,
    SparseLinearAttention,
    linear_branch,
    masked_attention,
    select_key_blocks,
    selection_block_mask,
    sparse_branch_flex,
    token_mask,
    topk_count,
)
from eflow.plugins.attention.vsa import (
    VideoSparseAttention,
    fine_stage_flex,
    slot_size,
    tile_counts,
    tile_of,
    tile_slots,
)
from eflow.registry import get_registry

GRID = (6, 4, 4)  # N = 96
DIM, HEADS, BATCH = 32, 2, 2


def make_ctx(grid=GRID, batch=BATCH, keep=None, head_dim=DIM // HEADS, seed=0, device="cpu"):
    return attention_inputs.make_ctx(grid, batch, keep, head_dim, seed, device)


def qkv_and_x(module, ctx, seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    x = torch.randn(ctx.index.shape[0], ctx.index.shape[1], module.dim, dtype=dtype)
    with torch.no_grad():
        q, k, v = module.project(x, ctx)
    return q, k, v, x


def expected_topk(sparsity, n):
    return max(1, math.ceil((1 - sparsity) * n - 1e-9))


def phi(x, kind):
    return {"softmax": lambda t: t.softmax(-1), "elu": lambda t: F.elu(t) + 1, "relu": F.relu}[kind](x)


def masked_softmax(q, k, v, allowed):
    """One head: q, k, v [M, d], allowed [M, M] bool -> [M, d]."""
    scores = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


# ----- brute-force references ------------------------------------------------------------------------
def brute_force_sla(q, k, v, block_q, block_k, sparsity, kind, proj_l):
    """SLA per sample and head with loops: returns [B, M, H, d]."""
    b_, m, h_, d = q.shape
    out = torch.zeros_like(q)
    q_blocks = [range(s, min(s + block_q, m)) for s in range(0, m, block_q)]
    k_blocks = [range(s, min(s + block_k, m)) for s in range(0, m, block_k)]
    top = expected_topk(sparsity, len(k_blocks))
    for b in range(b_):
        for h in range(h_):
            qs, ks, vs = q[b, :, h], k[b, :, h], v[b, :, h]
            centred = ks - ks.mean(0)
            pooled_q = torch.stack([qs[list(r)].mean(0) for r in q_blocks])
            pooled_k = torch.stack([centred[list(r)].mean(0) for r in k_blocks])
            chosen = (pooled_q @ pooled_k.T).topk(top, dim=-1).indices  # [QB, top]
            allowed = torch.zeros(m, m, dtype=torch.bool)
            for i, rows in enumerate(q_blocks):
                for j in chosen[i].tolist():
                    allowed[rows.start : rows.stop, k_blocks[j].start : k_blocks[j].stop] = True
            sparse = masked_softmax(qs, ks, vs, allowed)
            fq, fk = phi(qs, kind), phi(ks, kind)
            s_blocks = [fk[list(r)].T @ vs[list(r)] for r in k_blocks]  # S_j [d, d]
            z_blocks = [fk[list(r)].sum(0) for r in k_blocks]
            s_total, z_total = sum(s_blocks), sum(z_blocks)
            linear = torch.zeros(m, d, dtype=q.dtype)
            for i, rows in enumerate(q_blocks):
                s_sel = sum(s_blocks[j] for j in chosen[i].tolist())
                z_sel = sum(z_blocks[j] for j in chosen[i].tolist())
                fqi = fq[list(rows)]
                linear[list(rows)] = fqi @ (s_total - s_sel) / (fqi @ (z_total - z_sel) + LINEAR_EPS)[:, None]
            out[b, :, h] = sparse + linear @ proj_l.weight.T + proj_l.bias
    return out


def brute_force_vsa(q, k, v, x, index, grid, tile, sparsity, gate):
    """VSA per sample and head with loops: returns [B, M, H, d]."""
    b_, m, h_, d = q.shape
    _, height, width = grid
    tiles_per_axis = [-(-g // t) for g, t in zip(grid, tile, strict=True)]
    num_tiles = math.prod(tiles_per_axis)
    top = expected_topk(sparsity, num_tiles)
    g = (x @ gate.weight.T + gate.bias).unflatten(-1, (h_, d))
    out = torch.zeros_like(q)
    for b in range(b_):
        tile_id = []
        for n in index[b].tolist():
            t, rem = divmod(n, height * width)
            hh, w = divmod(rem, width)
            tile_id.append(
                ((t // tile[0]) * tiles_per_axis[1] + hh // tile[1]) * tiles_per_axis[2] + w // tile[2]
            )
        members = [[i for i in range(m) if tile_id[i] == j] for j in range(num_tiles)]
        present = torch.tensor([len(mem) > 0 for mem in members])
        for h in range(h_):
            qs, ks, vs = q[b, :, h], k[b, :, h], v[b, :, h]
            pooled = [
                torch.stack([t[mem].mean(0) if mem else torch.zeros(d, dtype=q.dtype) for mem in members])
                for t in (qs, ks, vs)
            ]
            scores = (pooled[0] @ pooled[1].T / math.sqrt(d)).masked_fill(~present[None, :], float("-inf"))
            coarse = scores.softmax(-1) @ pooled[2]  # [tiles, d]
            chosen = scores.topk(top, dim=-1).indices
            allowed = torch.zeros(m, m, dtype=torch.bool)
            for i in range(m):
                for j in chosen[tile_id[i]].tolist():
                    allowed[i, members[j]] = True
            fine = masked_softmax(qs, ks, vs, allowed)
            out[b, :, h] = coarse[tile_id] * g[b, :, h] + fine
    return out


# ----- SLA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize(
    "block_q, block_k, sparsity, kind",
    [(16, 8, 0.8, "softmax"), (20, 12, 0.6, "elu"), (32, 16, 0.5, "relu"), (128, 64, 0.8, "softmax")],
)
def test_sla_matches_brute_force(block_q, block_k, sparsity, kind, dropped):
    module = perturbed(SparseLinearAttention(DIM, HEADS, block_q, block_k, sparsity, kind))
    ctx = make_ctx(keep=70 if dropped else None)  # 70 and 96 leave partial last blocks for most sizes
    q, k, v, x = qkv_and_x(module, ctx)
    with torch.no_grad():
        got = module.attend(q, k, v, ctx, x)
        exact = brute_force_sla(q, k, v, block_q, block_k, sparsity, kind, module.proj_l)
        torch.testing.assert_close(got, exact, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(module.reference(q, k, v, ctx, x), exact, atol=1e-9, rtol=1e-7)
    assert module.proj_l.weight.abs().max() > 0  # the linear branch really contributed


@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_sla_flex_matches_reference_on_cpu(dropped):
    reference = perturbed(SparseLinearAttention(DIM, HEADS, 16, 8, impl="reference"))
    flex = SparseLinearAttention(DIM, HEADS, 16, 8, impl="flex").double()
    flex.load_state_dict(reference.state_dict())
    ctx = make_ctx(keep=70 if dropped else None)
    torch.manual_seed(4)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():  # eager flex_attention has no backward on CPU
        torch.testing.assert_close(flex(x, ctx), reference(x, ctx), atol=1e-10, rtol=1e-8)
    assert "flex_attention" in flex.kernel(x) and "(eager)" in flex.kernel(x)
    assert "M x M" in reference.kernel(x)


def test_sla_without_sparsity_is_dense_softmax():
    module = perturbed(SparseLinearAttention(DIM, HEADS, 16, 8, sparsity=0.0))
    ctx = make_ctx(keep=70)
    q, k, v, x = qkv_and_x(module, ctx)
    select = torch.ones(BATCH, HEADS, 5, 9, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(linear_branch(q, k, v, select, 16, 8, "softmax"), torch.zeros_like(q))
        out = module.attend(q, k, v, ctx, x) - module.proj_l.bias  # proj_l(0) = its bias
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-10, rtol=1e-8)


def test_sla_gradients_reach_every_parameter():
    module = perturbed(SparseLinearAttention(DIM, HEADS, 16, 8))
    ctx = make_ctx(keep=70)
    x = torch.randn(BATCH, 70, DIM, dtype=torch.float64, requires_grad=True)
    module(x, ctx).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_sla_zero_init_linear_projection_still_learns():
    module = SparseLinearAttention(DIM, HEADS, 16, 8).double()
    assert module.proj_l.weight.abs().max() == 0 and module.proj_l.bias.abs().max() == 0
    ctx = make_ctx()
    x = torch.randn(BATCH, ctx.num_tokens, DIM, dtype=torch.float64)
    module(x, ctx).square().sum().backward()
    assert module.proj_l.weight.grad.abs().max() > 0


def test_model_init_restores_zero_proj_l():
    model = build_model("tiny", attention="sla")
    sla = [b.attn for b in model.blocks() if isinstance(b.attn, SparseLinearAttention)]
    assert sla and all(a.proj_l.weight.abs().max() == 0 and a.proj_l.bias.abs().max() == 0 for a in sla)
    assert all(a.qkv.weight.abs().max() > 0 for a in sla)  # the DiT init did run


def test_topk_count():
    assert topk_count(0.8, 5) == 1  # (1 - 0.8) * 5 is 0.9999999999999998 in floating point
    assert topk_count(0.8, 10) == 2
    assert topk_count(0.8, 11) == 3
    assert topk_count(0.0, 7) == 7
    assert topk_count(0.99, 3) == 1
    assert topk_count(0.875, 64) == 8


def test_sla_flops_are_a_fraction_of_dense():
    ctx = make_ctx((21, 30, 52), batch=1, head_dim=128)
    module = SparseLinearAttention(1536, 12)
    m = ctx.num_tokens
    dense = 4.0 * 12 * m * m * 128
    ratio = module.flops(ctx, 1) / dense
    print(f"SLA flops at 32,760 tokens, 80% sparsity: {ratio:.3f} of dense softmax")
    assert 0.2 < ratio < 0.25  # 103 of 512 key blocks, plus an O(M d^2) linear branch


# ----- VSA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize("tile, sparsity", [((2, 2, 2), 0.875), ((4, 4, 4), 0.5), ((3, 2, 3), 0.7)])
def test_vsa_matches_brute_force(tile, sparsity, dropped):
    module = perturbed(VideoSparseAttention(DIM, HEADS, tile=tile, sparsity=sparsity))
    ctx = make_ctx(keep=40 if dropped else None)
    q, k, v, x = qkv_and_x(module, ctx)
    with torch.no_grad():
        got = module.attend(q, k, v, ctx, x)
        exact = brute_force_vsa(q, k, v, x, ctx.index, ctx.grid, tile, sparsity, module.gate)
        torch.testing.assert_close(got, exact, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(module.reference(q, k, v, ctx, x), exact, atol=1e-9, rtol=1e-7)


def test_vsa_tiles_use_original_raster_positions():
    """With dropped tokens, tiles come from the raster index, not from positions 0..M-1 of the kept tokens."""
    module = perturbed(VideoSparseAttention(DIM, HEADS, tile=(2, 2, 2), sparsity=0.875))
    ctx = make_ctx(keep=40)
    compacted = TokenContext(ctx.grid, torch.arange(40).expand(BATCH, 40), ctx.rope, True)
    q, k, v, x = qkv_and_x(module, ctx)
    with torch.no_grad():
        right = module.attend(q, k, v, ctx, x)
        wrong = module.attend(q, k, v, compacted, x)
    assert (right - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("tile", [(2, 2, 2), (4, 4, 4), (3, 2, 3), (4, 4, 8)])
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
def test_vsa_flex_matches_reference_on_cpu(tile, dropped):
    reference = perturbed(VideoSparseAttention(DIM, HEADS, tile=tile, impl="reference"))
    flex = VideoSparseAttention(DIM, HEADS, tile=tile, impl="flex").double()
    flex.load_state_dict(reference.state_dict())
    ctx = make_ctx(keep=40 if dropped else None)
    torch.manual_seed(4)
    x = torch.randn(BATCH, ctx.index.shape[1], DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flex(x, ctx), reference(x, ctx), atol=1e-10, rtol=1e-8)
    assert "tile-sparse" in flex.kernel(x)


def test_vsa_without_sparsity_fine_stage_is_dense_softmax():
    module = perturbed(VideoSparseAttention(DIM, HEADS, tile=(2, 2, 2), sparsity=0.0))
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.bias.zero_()  # out = coarse * 0 + fine
    ctx = make_ctx(keep=40)
    q, k, v, x = qkv_and_x(module, ctx)
    with torch.no_grad():
        torch.testing.assert_close(
            module.attend(q, k, v, ctx, x), dense_attention(q, k, v), atol=1e-10, rtol=1e-8
        )


def test_vsa_gradients_reach_every_parameter():
    module = perturbed(VideoSparseAttention(DIM, HEADS, tile=(2, 2, 2)))
    ctx = make_ctx(keep=40)
    x = torch.randn(BATCH, 40, DIM, dtype=torch.float64, requires_grad=True)
    module(x, ctx).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_vsa_tile_slots_are_unique_and_inside_their_tile():
    ctx = make_ctx(keep=40)
    tile = (3, 2, 3)
    tiles = tile_of(ctx.index, ctx.grid, tile)
    counts = tile_counts(tiles, 2 * 2 * 2)
    slot = slot_size(tile)
    pos = tile_slots(tiles, counts, slot)
    assert (
        slot == 64
        and slot_size((4, 4, 4)) == 64
        and slot_size((4, 4, 8)) == 128
        and slot_size((5, 5, 5)) == 128
    )
    for b in range(BATCH):
        assert len(set(pos[b].tolist())) == 40
    assert torch.equal(pos // slot, tiles)
    assert ((pos % slot) < counts.gather(1, tiles)).all()


def test_vsa_flops_are_a_fraction_of_dense():
    ctx = make_ctx((21, 30, 52), batch=1, head_dim=128)
    module = VideoSparseAttention(1536, 12)
    m = ctx.num_tokens
    ratio = module.flops(ctx, 1) / (4.0 * 12 * m * m * 128)
    print(f"VSA flops at 32,760 tokens, 87.5% sparsity: {ratio:.3f} of dense softmax")
    assert 0.12 < ratio < 0.16  # 78 of 624 tiles, plus the coarse stage and the gate


# ----- the block mask both flex paths use ------------------------------------------------------------
@pytest.mark.parametrize(
    "block_q, block_k, num_keys, length, flex_block, with_valid",
    [
        (16, 8, 70, 80, 16, False),
        (20, 12, 96, 96, 32, False),
        (64, 64, 256, 256, 128, True),
        (128, 64, 300, 384, 128, False),
        (7, 5, 50, 64, 16, True),
    ],
)
def test_selection_block_mask_applies_exactly_the_selection(
    block_q, block_k, num_keys, length, flex_block, with_valid
):
    """What the compiled kernel computes: full blocks as they are, partial blocks through the mask_mod,
    unlisted blocks not at all. That must be exactly the token pairs of the selected logical blocks among
    the real, valid keys; padded query rows (past num_keys) take the last query block's selection."""
    g = torch.Generator().manual_seed(length + block_q)
    qb, kb = -(-num_keys // block_q), -(-num_keys // block_k)
    select = torch.rand(2, 3, qb, kb, generator=g) < 0.3
    select[:, :, :, 0] = True  # every query block keeps the first key block (VSA and SLA always keep one)
    valid = (
        torch.rand(2, length, generator=g) < 0.7 if with_valid else torch.ones(2, length, dtype=torch.bool)
    )
    valid[:, :flex_block] = True  # the first flex block of keys all valid...
    if with_valid:
        select[:, :, :, : -(-flex_block // block_k)] = (
            True  # ...and selected everywhere: some blocks are full
        )
    bm = selection_block_mask(
        select, block_q, block_k, length, num_keys, valid if with_valid else None, flex_block
    )
    qi = (torch.arange(length) // block_q).clamp(max=qb - 1)
    kj = (torch.arange(length) // block_k).clamp(max=kb - 1)
    real = valid & (torch.arange(length) < num_keys)
    exact = select[:, :, qi][:, :, :, kj] & real[:, None, None, :]  # [B, H, L, L]
    assert exact.any(-1).all()  # every query row, padding included, sees a key

    nb = -(-length // flex_block)
    b, h, qq, kk = torch.meshgrid(
        torch.arange(2),
        torch.arange(3),
        torch.arange(nb * flex_block),
        torch.arange(nb * flex_block),
        indexing="ij",
    )
    by_mod = bm.mask_mod(b, h, qq, kk)  # the mask_mod on every pair, padding included
    applied = torch.zeros(2, 3, nb * flex_block, nb * flex_block, dtype=torch.bool)
    listed = torch.zeros(2, 3, nb, nb, dtype=torch.int64)
    for bi in range(2):
        for hi in range(3):
            for i in range(nb):
                rows = slice(i * flex_block, (i + 1) * flex_block)
                for j in bm.kv_indices[bi, hi, i, : bm.kv_num_blocks[bi, hi, i]].tolist():
                    cols = slice(j * flex_block, (j + 1) * flex_block)
                    applied[bi, hi, rows, cols] = by_mod[bi, hi, rows, cols]
                    listed[bi, hi, i, j] += 1
                for j in bm.full_kv_indices[bi, hi, i, : bm.full_kv_num_blocks[bi, hi, i]].tolist():
                    applied[bi, hi, rows, j * flex_block : (j + 1) * flex_block] = True
                    listed[bi, hi, i, j] += 1
    assert listed.max() <= 1  # no block listed twice
    assert torch.equal(applied[:, :, :length, :length], exact)
    assert not applied[:, :, :, num_keys:].any()  # padded keys never attended
    assert bm.full_kv_num_blocks.sum() > 0 or not with_valid
    assert listed.sum() < 2 * 3 * nb * nb  # the selection really is sparse at block level


# ----- options ---------------------------------------------------------------------------------------
def test_sla_options():
    entry = get_registry("attention").get("sla")
    module = entry.create(DIM, HEADS)
    assert (module.block_q, module.block_k, module.sparsity, module.feature_map) == (128, 128, 0.8, "softmax")
    assert entry.create(DIM, HEADS, options={"feature_map": "elu", "block_k": 32}).block_k == 32
    for bad, field in [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"feature_map": "gelu"}, "feature_map"),
        ({"block_q": 0}, "block_q"),
        ({"impl": "triton"}, "impl"),
        ({"blocks": 64}, "blocks"),
    ]:
        with pytest.raises(Exception, match=field):
            entry.create(DIM, HEADS, options=bad)


def test_vsa_options():
    entry = get_registry("attention").get("vsa")
    module = entry.create(DIM, HEADS)
    assert (module.tile, module.sparsity) == ((4, 4, 8), 0.875)
    assert entry.create(DIM, HEADS, options={"tile": [2, 4, 4]}).tile == (2, 4, 4)
    for bad, field in [
        ({"sparsity": 0.995}, "sparsity"),
        ({"tile": (4, 0, 4)}, "tile"),
        ({"tile": (4, 4)}, "tile"),
        ({"impl": "cuda"}, "impl"),
        ({"tiles": (4, 4, 4)}, "tiles"),
    ]:
        with pytest.raises(Exception, match=field):
            entry.create(DIM, HEADS, options=bad)


def test_both_are_registered_with_summaries():
    registry = get_registry("attention")
    assert {"sla", "vsa"} <= set(registry.names())
    assert "Sparse-Linear" in registry.get("sla").summary and "Video Sparse" in registry.get("vsa").summary


# ----- in the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "attention, options", [("sla", {"block_q": 16, "block_k": 8}), ("vsa", {"tile": (2, 2, 2)})]
)
def test_tiny_model_trains_with_and_without_keep(attention, options):
    torch.manual_seed(0)
    model = build_model(
        "tiny", overrides={"patch": (1, 2, 2)}, attention=attention, attention_options=options
    )
    with (
        torch.no_grad()
    ):  # move the AdaLN-Zero gates and the zero head off zero, so every block gets gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 4, 8, 8)  # grid (4, 4, 4): 64 tokens
    t = torch.tensor([0.9, 0.4])
    cond = Condition(labels=torch.tensor([3, 1]))
    keep = torch.stack([torch.randperm(64)[:40].sort().values for _ in range(2)])
    for kwargs in ({}, {"keep": keep}):
        model.zero_grad()
        out = model(x, t, t * 0.5, cond, **kwargs)
        assert out.shape == x.shape and torch.isfinite(out).all()
        (out.square().mean() + model.head.linear.weight.square().sum()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g_).all() for g_ in grads)
        efficient = [b.attn for b in model.blocks() if b.attn.__class__.__name__ != "SoftmaxAttention"]
        assert efficient and all(a.qkv.weight.grad.abs().max() > 0 for a in efficient)


# ----- GPU: compiled flex vs the reference -----------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FACTORIES = {
    "sla": lambda dim, heads, impl: SparseLinearAttention(dim, heads, impl=impl),
    "vsa": lambda dim, heads, impl: VideoSparseAttention(dim, heads, impl=impl),
}


def flex_branch_and_mask(module, q, k, v, ctx):
    """The flex softmax branch alone (SLA's sparse part, VSA's fine stage) and its [B, H, M, M] token mask."""
    if isinstance(module, SparseLinearAttention):
        select = select_key_blocks(q, k, module.block_q, module.block_k, module.sparsity)
        fast = sparse_branch_flex(q, k, v, select, module.block_q, module.block_k)
        return fast, token_mask(select, module.block_q, module.block_k, q.shape[1])
    tiles, _, select, counts = module._coarse(q, k, v, ctx)
    fast = fine_stage_flex(q, k, v, tiles, counts, select, slot_size(module.tile))
    return fast, module.token_mask(select, tiles)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dropped", [False, True], ids=["dense", "dropped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["sla", "vsa"])
def test_compiled_flex_matches_reference_on_cuda(name, dtype, dropped):
    grid, dim, heads, batch = (8, 16, 16), 512, 4, 2  # N = 2048 tokens, head_dim 128
    keep = 1024 if dropped else None
    ctx = make_ctx(grid, batch=batch, keep=keep, head_dim=dim // heads, device="cuda")
    m = ctx.index.shape[1]
    torch.manual_seed(6)
    reference = FACTORIES[name](dim, heads, "reference").cuda()
    with torch.no_grad():  # the linear branch / coarse gate must matter in the comparison
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    flex = FACTORIES[name](dim, heads, "flex").cuda()
    flex.load_state_dict(reference.state_dict())
    x = torch.randn(batch, m, dim, device="cuda")
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    outputs, grads = outputs_and_input_grads((flex, reference), x, ctx, dtype)  # through the compiled kernels
    assert torch.isfinite(outputs[0]).all() and torch.isfinite(grads[0]).all()
    assert rel_err(outputs[0], outputs[1]) < tol
    assert rel_err(grads[0], grads[1]) < tol
    assert "compiled" in flex.kernel(x)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        q, k, v = reference.project(x, ctx)
        fast, mask = flex_branch_and_mask(flex, q, k, v, ctx)
    exact = masked_attention(q.double(), k.double(), v.double(), mask)  # the same selection, in fp64
    assert fast.dtype == q.dtype
    assert rel_err(fast, exact) < tol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["sla", "vsa"])
def test_compiled_flex_runs_at_480p_without_m_by_m(name):
    grid, dim, heads = (21, 30, 52), 1536, 12  # N = 32,760 tokens
    ctx = make_ctx(grid, batch=1, head_dim=dim // heads, device="cuda")
    module = FACTORIES[name](dim, heads, "flex").cuda()
    m = ctx.num_tokens
    x = torch.randn(1, m, dim, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    q, k, v = (torch.randn(1, m, heads, dim // heads, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    xb = x.bfloat16()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        o = module.attend(q, k, v, ctx, xb)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    scores = m * m * heads * 2  # one bf16 [H, M, M] score tensor: 25.8 GB
    print(
        f"{name} attend at {m} tokens: peak {peak / 2**30:.2f} GiB (M x M x H bf16: {scores / 2**30:.1f} GiB)"
    )
    assert torch.isfinite(o).all()
    assert peak < scores / 8
