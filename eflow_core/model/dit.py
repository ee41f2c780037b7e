"""The VideoDiT of EFlow (5.1, B.1): Wan 2.1 blocks in SPRINT's encoder / middle / decoder layout."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from eflow.condition import Condition
from eflow.errors import EflowError
from eflow.model.blocks import DiTBlock, FinalLayer
from eflow.model.embeddings import LabelEmbedder, PatchEmbed3D, TextProjection, TimestepEmbedder, unpatchify
from eflow.model.presets import PRESETS, ModelSpec
from eflow.model.rope import rope_table
from eflow.model.tokens import TokenContext
from eflow.registry import get_registry

PATHS = ("full", "weak")
AXES = (("frames", "t"), ("height", "h"), ("width", "w"))


class VideoDiT(nn.Module):
    """Video diffusion transformer predicting F(x_t, t, s, c); the solution map is f = x_t + (s - t) F.

    patchify -> encoder (dense) -> [drop] -> middle (kept tokens) -> [restore with MASK] ->
    fuse(concat(middle, encoder copy)) -> decoder (dense) -> AdaLN head -> unpatchify.
    Blocks use `attention`; for a hybrid backend (GLGA: `hybrid = True`) global block i is full softmax
    when spec.is_softmax_block(i), while baselines (Sana, SLA, VSA, tiles) replace every block.
    in_channels / num_classes / text_dim of None take the spec's; text_dim alone (num_classes None)
    makes a text-only model, num_classes=0 drops the class embedding.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        attention: str = "glga",
        attention_options: dict[str, Any] | BaseModel | None = None,
        softmax_options: dict[str, Any] | BaseModel | None = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        text_dim: int | None = None,
        guidance_embed: bool = True,
    ):
        super().__init__()
        if num_classes is None:  # passing text_dim alone makes a text-to-video model (no class labels)
            num_classes = None if text_dim is not None else spec.num_classes
        spec = replace(
            spec,
            in_channels=in_channels if in_channels is not None else spec.in_channels,
            num_classes=num_classes or None,
            text_dim=text_dim if text_dim is not None else spec.text_dim,
        )
        self.spec, self.attention = spec, attention
        dim, patch = spec.dim, tuple(spec.patch)
        if dim % spec.heads:
            raise EflowError(f"model dim {dim} is not divisible by heads {spec.heads}")
        self.head_dim = dim // spec.heads

        self.patch_embed = PatchEmbed3D(spec.in_channels, dim, patch)
        self.time_embed = TimestepEmbedder(dim)  # t in [0, 1]
        self.gap_embed = TimestepEmbedder(dim)  # t - s in [0, 1]
        self.guidance_embed = TimestepEmbedder(dim) if guidance_embed else None  # w
        self.label_embed = LabelEmbedder(spec.num_classes, dim) if spec.num_classes else None
        self.text_embed = TextProjection(spec.text_dim, dim) if spec.text_dim else None
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # shared by every block

        hybrid = get_registry("attention").get(attention).capability("hybrid")
        self.block_attention = [
            "softmax" if attention == "softmax" or (hybrid and spec.is_softmax_block(i)) else attention
            for i in range(spec.depth)
        ]
        blocks = [
            DiTBlock(
                dim,
                spec.ffn_dim,
                self._make_attention(name, attention_options if name == attention else softmax_options, i),
                spec.heads,
                cross_attention=spec.text_dim is not None,
            )
            for i, name in enumerate(self.block_attention)
        ]
        n_enc, n_mid = spec.encoder_blocks, spec.middle_blocks
        self.encoder = nn.ModuleList(blocks[:n_enc])
        self.middle = nn.ModuleList(blocks[n_enc : n_enc + n_mid])
        self.decoder = nn.ModuleList(blocks[n_enc + n_mid :])
        self.fuse = nn.Linear(2 * dim, dim)  # concat(restored middle output, encoder copy) -> D
        self.head = FinalLayer(dim, math.prod(patch) * spec.in_channels)
        # SPRINT's [MASK]: a fixed random vector (std 0.02) at dropped positions; saved, never trained.
        self.register_buffer("mask_token", torch.randn(dim) * 0.02)
        self._rope_cache: dict[tuple, Tensor] = {}
        self.initialize_weights()

    def _make_attention(
        self, name: str, options: dict[str, Any] | BaseModel | None, block: int = 0
    ) -> nn.Module:
        """A self-attention backend from the registry for global block `block`; GLGA-like backends get
        spec.window_frames by default, and a backend with an option `block` gets the block's index (to pick
        its entry of per-block option lists, e.g. tile's searched masks)."""
        entry = get_registry("attention").get(name)
        if not isinstance(options, BaseModel):
            options = dict(options or {})
            fields = entry.options.model_fields if entry.options is not None else {}
            if "window_frames" in fields and "window_frames" not in options:
                options["window_frames"] = self.spec.window_frames
            if "block" in fields and "block" not in options:
                options["block"] = block
        module = entry.create(self.spec.dim, self.spec.heads, options=options)
        module.registered_as = f"attention '{name}' (plugin '{entry.owner}')"  # named in shape errors
        return module

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, zero AdaLN modulation and output; backends may refine via init_weights()."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        for m in self.modules():  # a backend with a special init (e.g. a zero-init branch) restores it here
            if m is not self and callable(getattr(m, "init_weights", None)):
                m.init_weights()
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for emb in (self.time_embed, self.gap_embed, self.guidance_embed):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for layer in (self.time_proj[1], self.head.adaLN[1], self.head.linear):  # AdaLN-Zero: F = 0 at init
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for block in self.blocks():
            nn.init.zeros_(block.modulation)

    # ----- geometry -------------------------------------------------------------------------------
    def token_grid(self, x_shape) -> tuple[int, int, int]:
        """(T', H', W') token grid of a video [B, C, T, H, W] (or [C, T, H, W]); clear error if a size does not divide."""
        sizes = tuple(x_shape)[-3:]
        for size, p, (name, axis) in zip(sizes, self.spec.patch, AXES, strict=True):
            if size % p:
                raise EflowError(
                    f"{name}={size} is not divisible by the patch size {p} along {axis}; "
                    f"use a multiple of {p} (e.g. {max(p, round(size / p) * p)})"
                )
        return tuple(size // p for size, p in zip(sizes, self.spec.patch, strict=True))

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """RoPE angles [N, head_dim // 2] of the grid, built once per (grid, device) and cached."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_table(grid, self.head_dim, self.spec.rope_theta, device=device)
        return self._rope_cache[key]

    def blocks(self) -> list[DiTBlock]:
        """All blocks in global order (encoder, middle, decoder)."""
        return [*self.encoder, *self.middle, *self.decoder]

    # ----- conditioning ---------------------------------------------------------------------------
    def condition_vector(
        self, t: Tensor, s: Tensor, cond: Condition | None, guidance: Tensor | float | None, batch: int
    ) -> Tensor:
        """c = emb_t(t) + emb_gap(t - s) + emb_w(w) + emb_label(y): [B, D]."""
        device = self.time_proj[1].weight.device
        t, s = _per_sample(t, batch, device), _per_sample(s, batch, device)
        c = self.time_embed(t) + self.gap_embed(t - s)
        if self.guidance_embed is not None:
            w = 0.0 if guidance is None else guidance  # no guidance given: w = 0
            c = c + self.guidance_embed(_per_sample(w, batch, device))
        if self.label_embed is not None:
            if cond is None or cond.labels is None:
                raise EflowError(
                    f"this model is class-conditional ({self.spec.num_classes} classes): pass Condition(labels=...)"
                )
            c = c + self.label_embed(cond.labels.to(device))
        return c

    def text_tokens(self, cond: Condition | None) -> tuple[Tensor | None, Tensor | None]:
        """Projected text tokens [B, L, D] and mask [B, L] (None, None for a model without text)."""
        if self.text_embed is None:
            return None, None
        if cond is None or cond.text is None:
            raise EflowError(
                f"this model is text-conditioned (text_dim={self.spec.text_dim}): pass Condition(text=..., text_mask=...)"
            )
        device = self.time_proj[1].weight.device
        return self.text_embed(cond.text.to(device)), cond.text_mask.to(device)

    # ----- forward --------------------------------------------------------------------------------
    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Condition | None,
        guidance: Tensor | float | None = None,
        path: str = "full",
        keep: Tensor | None = None,
    ) -> Tensor:
        """F [B, C, T, H, W] at x_t [B, C, T, H, W], times t, s [B]; keep [B, M] sorted kept indices (full path)."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if x_t.dim() != 5 or x_t.shape[1] != self.spec.in_channels:
            raise EflowError(
                f"expected a video batch [B, {self.spec.in_channels}, T, H, W], got shape {tuple(x_t.shape)}"
            )
        b = x_t.shape[0]
        grid = self.token_grid(x_t.shape)
        c = self.condition_vector(t, s, cond, guidance, b)  # [B, D]
        mod = self.time_proj(c).unflatten(1, (6, self.spec.dim))  # [B, 6, D]
        text, text_mask = self.text_tokens(cond)  # [B, L, D], [B, L]

        x = self.patch_embed(x_t)  # [B, N, D]
        rope = self.rope(grid, x.device)  # [N, head_dim / 2]
        ctx = TokenContext.dense(grid, b, rope)
        for block in self.encoder:
            x = block(x, mod, ctx, text, text_mask)
        h_enc = x  # the long residual path to the fusion layer

        if path == "weak":  # PDG: skip the middle stack; its output is [MASK] everywhere
            mid = self.mask_token.to(x.dtype).expand_as(x)
        else:
            mid_ctx = ctx
            if keep is not None:
                if keep.dim() != 2 or keep.shape[0] != b:
                    raise ValueError(f"keep must be [B={b}, M] raster indices, got shape {tuple(keep.shape)}")
                mid_ctx = ctx.select(keep.to(x.device), rope)
            h = mid_ctx.gather(x)  # [B, M, D]
            for block in self.middle:
                h = block(h, mod, mid_ctx, text, text_mask)
            mid = mid_ctx.scatter(h, fill=self.mask_token.to(h.dtype))  # [B, N, D], [MASK] where dropped

        x = self.fuse(torch.cat([mid, h_enc.to(mid.dtype)], dim=-1))  # [B, N, 2D] -> [B, N, D]
        for block in self.decoder:
            x = block(x, mod, ctx, text, text_mask)
        out = self.head(x, c)  # [B, N, pt*ph*pw*C]
        return unpatchify(out, grid, self.spec.patch)  # [B, C, T, H, W]

    # ----- bookkeeping ----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: each embedding, embeddings (their sum), encoder, middle, decoder, fusion, head, total."""

        def n(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        counts = {
            "patch": n(self.patch_embed),
            "time": n(self.time_embed),
            "gap": n(self.gap_embed),
            "guidance": n(self.guidance_embed),
            "label": n(self.label_embed),
            "text": n(self.text_embed),
            "modulation": n(self.time_proj),
        }
        counts["embeddings"] = sum(counts.values())
        counts.update(
            encoder=n(self.encoder),
            middle=n(self.middle),
            decoder=n(self.decoder),
            fusion=n(self.fuse),
            head=n(self.head),
            self_attention=sum(n(block.attn) for block in self.blocks()),
            total=n(self),
        )
        return counts


def _per_sample(v: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] value -> float [B] on device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=device)
    return v.expand(batch) if v.dim() == 0 else v.reshape(batch).float()


def build_model(preset: str, overrides: dict[str, Any] | None = None, **kwargs: Any) -> VideoDiT:
    """A VideoDiT from a named preset (see PRESETS), with ModelSpec fields overridden; kwargs go to VideoDiT."""
    if preset not in PRESETS:
        raise EflowError(f"unknown model preset '{preset}'; choices: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if overrides:
        names = [f.name for f in fields(ModelSpec)]
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise EflowError(
                f"model.overrides: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(names)}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        spec = replace(spec, **values)
    return VideoDiT(spec, **kwargs)
