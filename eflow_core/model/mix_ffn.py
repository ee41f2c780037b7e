"""Mix-FFN (Sana's GLUMBConv, with Sana-Video's residual temporal conv): a convolutional FFN on the grid.

For tokens x [B, M, D] on the (T', H', W') grid, with hidden width h and k_s x k_s / k_t kernels:

    u = SiLU(x W_1 + b_1)                                   [B, M, 2h]   pointwise (a 1x1 conv)
    u = DWConv_{1 x k_s x k_s}(u)                           [B, M, 2h]   depthwise, per frame, on (H', W')
    a, g = split(u)                                         [B, M, h] each
    y = (a * SiLU(g)) W_2                                   [B, M, D]    pointwise, no bias
    y = y + TConv_{k_t x 1 x 1}(y)                          [B, M, D]    temporal residual (video), zero-init

Convolutions pad with zeros at the grid's borders. They need the dense grid: with dropped tokens the
kept tokens are scattered into [B, N, C] with ZEROS at the dropped places, convolved, and gathered back,
so a kept token next to a dropped one sees zeros where its neighbour was. This is how Sana meets token
dropping (EFlow Table 2: its FVD collapses under dropping), and it is reproduced as is, not hidden.

The temporal conv is depthwise by default (k_t D weights: the block keeps the parameter count of
EFlow Table 2's Sana), "full" mixes channels (k_t D^2 weights), "none" gives image Sana's GLUMBConv.
It starts at zero (init_weights), so the block starts as the image Mix-FFN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eflow.model.tokens import TokenContext

TemporalConv = Literal["depthwise", "full", "none"]


def conv_per_frame(x: Tensor, ctx: TokenContext, conv: nn.Conv2d) -> Tensor:
    """A 2D conv of every frame of tokens x [B, M, C]: scatter (zeros where dropped), conv, gather.

    Frames fold into the batch and the conv runs on a channels-last view of the dense tokens (measured on
    an H100 at 480p with 9216 channels: 5.5 ms fwd+bwd, against 5.9 s for the same depthwise conv3d).
    """
    t, h, w = ctx.grid
    dense = ctx.scatter(x, 0.0)  # [B, N, C]
    frames = dense.reshape(-1, h, w, dense.shape[-1]).permute(0, 3, 1, 2)  # [B T', C, H', W'] channels-last
    out = conv(frames).permute(0, 2, 3, 1)  # [B T', H', W', C_out]
    return ctx.gather(out.reshape(dense.shape[0], t * h * w, -1))  # [B, M, C_out]


def conv_along_time(x: Tensor, ctx: TokenContext, conv: nn.Conv2d) -> Tensor:
    """A k_t x 1 x 1 conv along T' of tokens x [B, M, C]: scatter (zeros where dropped), conv, gather.

    Depthwise: a sum of k_t shifted copies (faster than cuDNN's depthwise kernel here); full: conv2d with
    kernel (k_t, 1) on a channels-last [B, C, T', H' W'] view.
    """
    t, h, w = ctx.grid
    dense = ctx.scatter(x, 0.0)  # [B, N, C]
    b, _, c = dense.shape
    frames = dense.view(b, t, h * w, c)  # [B, T', H' W', C]
    k = conv.kernel_size[0]
    if conv.groups == c:
        padded = F.pad(frames, (0, 0, 0, 0, k // 2, k // 2))  # zero frames before and after
        taps = conv.weight[:, 0, :, 0].to(dense.dtype)  # [C, k]; bf16 under autocast, like the conv
        out = sum(padded[:, i : i + t] * taps[:, i] for i in range(k))
    else:
        out = conv(frames.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, T', H' W', C]
    return ctx.gather(out.reshape(b, t * h * w, c))


class MixFFN(nn.Module):
    """GLUMBConv Mix-FFN, called as ffn(x [B, M, D], ctx) -> [B, M, D]; needs ctx for the grid."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        spatial_kernel: int = 3,
        temporal_kernel: int = 3,
        temporal_conv: TemporalConv = "depthwise",
    ):
        super().__init__()
        for name, size in (("spatial_kernel", spatial_kernel), ("temporal_kernel", temporal_kernel)):
            if size < 1 or size % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number (same-size output), got {size}")
        if temporal_conv not in ("depthwise", "full", "none"):
            raise ValueError(f"temporal_conv must be one of depthwise, full, none; got {temporal_conv!r}")
        self.dim, self.hidden, self.temporal_kind = dim, hidden, temporal_conv
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.SiLU()
        self.spatial_conv = nn.Conv2d(
            2 * hidden, 2 * hidden, spatial_kernel, padding=spatial_kernel // 2, groups=2 * hidden
        )  # per frame
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.temporal_conv = None
        if temporal_conv != "none":
            k = temporal_kernel
            groups = dim if temporal_conv == "depthwise" else 1
            self.temporal_conv = nn.Conv2d(
                dim, dim, (k, 1), padding=(k // 2, 0), groups=groups, bias=False
            )  # on [B, D, T', H' W']
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the temporal residual conv, so the block starts as image Sana's Mix-FFN (Sana-Video)."""
        if self.temporal_conv is not None:
            nn.init.zeros_(self.temporal_conv.weight)

    def forward(self, x: Tensor, ctx: TokenContext | None = None) -> Tensor:
        """x [B, M, D] on ctx's grid -> [B, M, D]."""
        if ctx is None:
            raise ValueError("MixFFN convolves on the token grid: call it as ffn(x, ctx) with a TokenContext")
        u = self.act(self.fc1(x))  # [B, M, 2h]
        u = conv_per_frame(u, ctx, self.spatial_conv)  # [B, M, 2h]
        value, gate = u.chunk(2, dim=-1)  # [B, M, h] each
        y = self.fc2(value * self.act(gate))  # [B, M, D]
        if self.temporal_conv is not None:
            y = y + conv_along_time(y, ctx, self.temporal_conv)
        return y

    def reference(self, x: Tensor, ctx: TokenContext) -> Tensor:
        """The same map written out: per-sample dense grids and explicit sums over kernel offsets."""
        u = F.silu(x @ self.fc1.weight.T + self.fc1.bias)  # [B, M, 2h]
        spatial = self.spatial_conv.weight[:, :, None]  # [2h, 1, 1, k_s, k_s]
        u = _shifted_sum_conv(u, ctx, spatial, self.spatial_conv.bias, depthwise=True)
        value, gate = u.chunk(2, dim=-1)
        y = (value * F.silu(gate)) @ self.fc2.weight.T  # [B, M, D]
        if self.temporal_conv is not None:
            depthwise = self.temporal_conv.groups > 1
            temporal = self.temporal_conv.weight[..., None]  # [D, D or 1, k_t, 1, 1]
            y = y + _shifted_sum_conv(y, ctx, temporal, None, depthwise=depthwise)
        return y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, temporal_conv={self.temporal_kind}"


def _shifted_sum_conv(
    x: Tensor, ctx: TokenContext, weight: Tensor, bias: Tensor | None, depthwise: bool
) -> Tensor:
    """Zero-padded 3D conv of tokens x [B, M, C] as a sum over kernel offsets on an explicit dense grid.

    weight [C_out, C_in or 1, kt, kh, kw]. Dropped grid places hold zeros. Returns [B, M, C_out].
    """
    bsz, m, c = x.shape
    t, h, w = ctx.grid
    kt, kh, kw = weight.shape[2:]
    grid = x.new_zeros(bsz, t + kt - 1, h + kh - 1, w + kw - 1, c)  # zero-padded dense grid
    for bi in range(bsz):
        for j in range(m):
            n = int(ctx.index[bi, j])
            ti, rem = divmod(n, h * w)
            hi, wi = divmod(rem, w)
            grid[bi, ti + kt // 2, hi + kh // 2, wi + kw // 2] = x[bi, j]
    out = x.new_zeros(bsz, t, h, w, weight.shape[0])
    for dt in range(kt):
        for dh in range(kh):
            for dw in range(kw):
                window = grid[:, dt : dt + t, dh : dh + h, dw : dw + w]  # [B, T', H', W', C]
                tap = weight[:, :, dt, dh, dw]  # [C_out, C_in or 1]
                out = out + (window * tap[:, 0] if depthwise else window @ tap.T)
    if bias is not None:
        out = out + bias
    out = out.flatten(1, 3)  # [B, N, C_out]
    return torch.stack([out[bi, ctx.index[bi]] for bi in range(bsz)])  # [B, M, C_out]
