"""The VideoDiT: presets and parameter counts, SPRINT drop/restore, the PDG weak path, conditioning."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from eflow.condition import NULL_LABEL, Condition
from eflow.errors import EflowError
from eflow.model.dit import VideoDiT, build_model
from eflow.model.embeddings import LabelEmbedder
from eflow.model.presets import PRESETS
from eflow.registry import get_registry, hookimpl, host

ATTENTIONS = ["softmax", "glga"]
SHAPE = (2, 3, 4, 8, 8)  # [B, C, T, H, W] -> grid (4, 4, 4), 64 tokens


def tiny(seed: int = 0, perturb: bool = True, **kwargs) -> VideoDiT:
    """The tiny preset with a 1x2x2 patch; `perturb` adds noise to every parameter so no AdaLN-Zero gate is zero."""
    torch.manual_seed(seed)
    model = build_model("tiny", overrides={"patch": (1, 2, 2)}, **kwargs)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*SHAPE, generator=g)
    t = torch.tensor([0.9, 0.4])
    return x, t, t * 0.5, Condition(labels=torch.tensor([3, NULL_LABEL]))


def kept_indices(model: VideoDiT, ratio: float = 0.75, seed: int = 0) -> torch.Tensor:
    grid = model.token_grid(SHAPE)
    sprint = get_registry("token_drop").create("sprint")
    return sprint.select(grid, SHAPE[0], ratio, torch.Generator().manual_seed(seed))


# ----- presets and parameter counts -----------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_on_meta_and_counts_parameters(preset, attention):
    with torch.device("meta"):
        model = build_model(preset, attention=attention)
    counts = model.parameter_counts()
    parts = ("embeddings", "encoder", "middle", "decoder", "fusion", "head")
    assert sum(counts[p] for p in parts) == counts["total"]
    print(f"{preset:>5} {attention:>8}: " + ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in counts.items()))


def test_xl_softmax_matches_table2_and_glga_adds_only_gates():
    with torch.device("meta"):
        softmax = build_model("XL", attention="softmax").parameter_counts()["total"]
        glga = build_model("XL", attention="glga").parameter_counts()["total"]
    print(f"XL softmax {softmax / 1e6:.1f}M (Table 2: 457M), GLGA {glga / 1e6:.1f}M (Table 2: 529M)")
    assert abs(softmax - 457e6) / 457e6 < 0.10
    assert softmax < glga < softmax * 1.01  # shared QKV: only W_g and the branch norms are new


def test_softmax_blocks_are_interleaved_every_k_efficient_blocks():
    assert PRESETS["XL"].softmax_blocks() == [8, 17, 26]
    assert PRESETS["B"].softmax_blocks() == [6, 13]
    assert PRESETS["XXL"].softmax_blocks() == [8, 17, 26, 35]
    with torch.device("meta"):
        model = build_model("XL")
        everywhere = build_model("B", attention="softmax")
    assert [i for i, a in enumerate(model.block_attention) if a == "softmax"] == [8, 17, 26]
    assert all(a == "glga" for i, a in enumerate(model.block_attention) if i not in (8, 17, 26))
    assert [type(b.attn).__name__ for b in model.blocks()].count("SoftmaxAttention") == 3
    assert set(everywhere.block_attention) == {"softmax"}


@pytest.mark.parametrize("baseline", ["sana", "sla", "vsa", "tile"])
def test_baselines_replace_every_block_and_only_glga_is_hybrid(baseline):
    with torch.device("meta"):
        model = build_model("B", attention=baseline)
    assert set(model.block_attention) == {baseline}  # no interleaved softmax blocks (EFlow Table 2 counts)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(
        EflowError, match=re.escape("unknown model preset 'L'; choices: tiny, B, XL, XXL, 1.5B")
    ):
        build_model("L")


class _WindowedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_frames: int = 99


class _WindowedAttention(nn.Module):
    def __init__(self, dim, num_heads, window_frames=99):
        super().__init__()
        self.window_frames = window_frames
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        return self.proj(x)


class _WindowedPlugin:
    @hookimpl
    def register_attention(self, register):
        register("test-windowed", _WindowedAttention, options=_WindowedOptions)


@pytest.fixture
def windowed_attention():
    name = host().register(_WindowedPlugin(), name="test-windowed-plugin")
    try:
        yield "test-windowed"
    finally:
        host().unregister(name)


def test_window_frames_defaults_to_the_spec_and_user_option_wins(windowed_attention):
    model = build_model("tiny", attention=windowed_attention)
    efficient = [
        b.attn for b in model.blocks() if isinstance(b.attn, _WindowedAttention)
    ]  # not hybrid: every block
    assert len(efficient) == 6 and {a.window_frames for a in efficient} == {PRESETS["tiny"].window_frames}
    model = build_model("tiny", attention=windowed_attention, attention_options={"window_frames": 3})
    assert {b.attn.window_frames for b in model.blocks() if isinstance(b.attn, _WindowedAttention)} == {3}
    with torch.device("meta"):
        glga = build_model("B", attention="glga").blocks()[0].attn
    assert glga.window_frames == PRESETS["B"].window_frames


# ----- forward --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_shapes_full_weak_and_dropped(attention):
    model = tiny(attention=attention)
    x, t, s, cond = inputs()
    for kwargs in ({}, {"path": "weak"}, {"keep": kept_indices(model)}):
        out = model(x, t, s, cond, guidance=torch.tensor([3.0, 3.0]), **kwargs)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_untrained_model_outputs_exactly_zero_until_the_head_moves():
    model = tiny(perturb=False)
    x, t, s, cond = inputs()
    assert torch.equal(model(x, t, s, cond), torch.zeros_like(x))
    assert torch.equal(model(x, t, s, cond, path="weak", guidance=4.0), torch.zeros_like(x))
    with torch.no_grad():
        model.head.linear.weight.normal_(std=0.02)
    assert model(x, t, s, cond).abs().max() > 0


def test_weak_path_never_runs_a_middle_block_and_full_path_runs_all():
    model = tiny()
    calls = []
    for i, block in enumerate(model.blocks()):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    x, t, s, cond = inputs()
    model(x, t, s, cond, path="weak")
    n_enc, n_mid = model.spec.encoder_blocks, model.spec.middle_blocks
    middle = set(range(n_enc, n_enc + n_mid))
    assert not middle & set(calls) and len(calls) == model.spec.depth - n_mid
    calls.clear()
    model(x, t, s, cond, path="full")
    assert calls == list(range(model.spec.depth))


def test_weak_path_output_does_not_depend_on_middle_weights():
    model = tiny()
    x, t, s, cond = inputs()
    before = model(x, t, s, cond, path="weak", keep=kept_indices(model))  # keep is ignored on the weak path
    with torch.no_grad():
        for p in model.middle.parameters():
            p.add_(1.0)
    assert torch.equal(model(x, t, s, cond, path="weak"), before)
    assert not torch.equal(model(x, t, s, cond), before)


def test_bad_path_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="path must be one of"):
        model(*inputs(), path="cheap")


def test_keep_with_every_index_equals_no_drop():
    model = tiny()
    x, t, s, cond = inputs()
    n = 64
    keep = torch.arange(n).expand(x.shape[0], n)
    assert torch.equal(model(x, t, s, cond, keep=keep), model(x, t, s, cond))


def test_middle_stack_depends_only_on_kept_tokens_and_dropped_places_hold_mask():
    model = tiny()
    x, t, s, cond = inputs()
    keep = kept_indices(model)
    dropped = torch.ones(x.shape[0], 64, dtype=torch.bool).scatter(1, keep, False)  # [B, N]
    fused = []
    model.fuse.register_forward_hook(lambda mod, args, out: fused.append(args[0].detach()))
    model(x, t, s, cond, keep=keep)

    def corrupt(mod, args, out):  # the encoder output changes at dropped places only
        return torch.where(dropped[..., None], out + 10 * torch.randn_like(out), out)

    hook = model.encoder[-1].register_forward_hook(corrupt)
    model(x, t, s, cond, keep=keep)
    hook.remove()
    (mid0, enc0), (mid1, enc1) = (f.chunk(2, dim=-1) for f in fused)
    assert torch.equal(mid0, mid1)  # the middle stack never saw the dropped tokens
    assert not torch.equal(enc0, enc1)  # while the long residual path did
    assert torch.equal(mid0[dropped], model.mask_token.expand(int(dropped.sum()), -1))
    assert not (mid0[~dropped] == model.mask_token).all(dim=-1).any()
    assert not model.mask_token.requires_grad and "mask_token" in model.state_dict()


def test_weak_path_feeds_mask_everywhere_to_the_fusion_layer():
    model = tiny()
    fused = []
    model.fuse.register_forward_hook(lambda mod, args, out: fused.append(args[0].detach()))
    model(*inputs(), path="weak")
    mid = fused[0].chunk(2, dim=-1)[0]
    assert torch.equal(mid, model.mask_token.expand_as(mid))


def test_patch_sizes_that_do_not_divide_name_the_dimension():
    model = tiny()
    with pytest.raises(
        EflowError, match=r"height=31 is not divisible by the patch size 2 along h; .*\(e\.g\. 32\)"
    ):
        model.token_grid((1, 3, 4, 31, 16))
    with torch.device("meta"):
        video = VideoDiT(replace(PRESETS["tiny"], patch=(2, 2, 2)))
    with pytest.raises(EflowError, match=r"model\.overrides: unknown field"):
        build_model("tiny", overrides={"patchsize": 2})
    message = "frames=7 is not divisible by the patch size 2 along t; use a multiple of 2 (e.g. 8)"
    with pytest.raises(EflowError, match=re.escape(message)):
        video.token_grid((1, 3, 7, 16, 16))
    assert video.token_grid((1, 3, 8, 16, 32)) == (4, 8, 16)


def test_null_label_uses_its_own_last_row():
    emb = LabelEmbedder(5, 4)
    assert torch.equal(emb(torch.tensor([NULL_LABEL])), emb.table.weight[5:6])


def test_text_conditioned_model_handles_a_fully_masked_null_text():
    model = tiny(text_dim=16)
    assert model.label_embed is None and model.blocks()[0].cross_attn is not None
    x, t, s, _ = inputs()
    g = torch.Generator().manual_seed(2)
    text_a, text_b = torch.randn(2, 2, 5, 16, generator=g)
    null = torch.zeros(2, 5, dtype=torch.bool)
    out_a = model(x, t, s, Condition(text=text_a, text_mask=null))
    out_b = model(x, t, s, Condition(text=text_b, text_mask=null))
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)  # the null condition ignores whatever sits under the mask
    assert not torch.equal(model(x, t, s, Condition(text=text_a)), out_a)
    with pytest.raises(EflowError, match="text-conditioned"):
        model(x, t, s, Condition(labels=torch.tensor([0, 1])))


def test_guidance_embedding_changes_the_output():
    model = tiny()
    x, t, s, cond = inputs()
    assert not torch.equal(model(x, t, s, cond, guidance=2.0), model(x, t, s, cond, guidance=4.0))
    plain = tiny(guidance_embed=False)
    assert plain.guidance_embed is None
    assert torch.equal(plain(x, t, s, cond, guidance=2.0), plain(x, t, s, cond, guidance=4.0))


def test_same_seed_builds_the_same_model_and_forward_is_deterministic():
    a, b = tiny(seed=5), tiny(seed=5)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    x, t, s, cond = inputs()
    keep = kept_indices(a)
    assert torch.equal(a(x, t, s, cond, keep=keep), b(x, t, s, cond, keep=keep))
    assert torch.equal(a(x, t, s, cond), a(x, t, s, cond))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bf16_autocast_runs_with_drop_and_text(attention):
    model = tiny(attention=attention, text_dim=16, num_classes=8)
    x, t, s, _ = inputs()
    cond = Condition(labels=torch.tensor([1, NULL_LABEL]), text=torch.randn(2, 3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, s, cond, guidance=3.0, keep=kept_indices(model))
        weak = model(x, t, s, cond.null(), path="weak")
    assert out.dtype == weak.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert model.middle[0].ffn.fc1.weight.grad is not None
