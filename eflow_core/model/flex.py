"""flex_attention as the attention backends use it: block tables, BlockMasks, compiled calls, padding.

A backend describes its sparsity as two [B, H, QB, KB] bool tables over blocks of BLOCK queries and keys,
`partial` (the mask_mod decides per pair) and `full` (every pair attends, the mask_mod is skipped), plus
a mask_mod; `from_tables` turns them into a BlockMask without any M x M tensor and without compiling.
`run` calls flex_attention: compiled on CUDA, once per process and mask kind; eager on CPU (the test
path, forward only). Masks that depend on the token positions alone are built once per forward through
`TokenContext.cached`, so every block of a forward shares them and no module keeps a global cache.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Impl = Literal["auto", "reference", "flex"]

# flex_attention's block (queries and keys), its default. Its H100 kernels tile 128 x 64 forward and
# 64 x 128 / 128 x 64 backward (bf16, head_dim 128), and a BlockMask's block must be a multiple of both:
# with (128, 64) blocks the forward runs but the backward finds no kernel config (NoValidChoicesError,
# torch 2.11). 128 on each side is what every dtype and head_dim accepts.
BLOCK = 128

FAR = 2**40  # key given to padding (raster index, frame): farther than any window from every real key
HAS_SEQ_LENGTHS = "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters  # newer torch


def resolve_impl(impl: Impl, q: Tensor) -> str:
    """'flex' or 'reference' for inputs like q: 'auto' is flex on CUDA, reference elsewhere."""
    return ("flex" if q.is_cuda else "reference") if impl == "auto" else impl


def num_blocks(length: int, block: int) -> int:
    """ceil(length / block): blocks covering `length` tokens, a partial last one included."""
    return -(-length // block)


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 of x [B, M, ...] to `length`."""
    if length == x.shape[1]:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def block_ranges(key: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token keys [B, M], sorted along M (raster indices, frames) -> (padded, first, last).

    padded [B, nb * block]: the keys with FAR in the padding, so a window around a real key never holds
    it; first, last [B, nb]: the smallest and largest real key of each block (every block starts real).
    """
    m = key.shape[1]
    nb = num_blocks(m, block)
    padded = F.pad(key, (0, nb * block - m), value=FAR)  # [B, nb * block]
    first = padded[:, ::block]
    last = key[:, (torch.arange(nb, device=key.device) * block + block - 1).clamp(max=m - 1)]
    return padded, first, last


def clear_ragged(full: Tensor, length: int, block: int) -> Tensor:
    """full [B, QB, KB] less the last query and key block when it holds padding (the mask_mod must hide it)."""
    nb = full.shape[-1]
    ragged = torch.zeros(nb, dtype=torch.bool, device=full.device)
    ragged[-1] = nb * block != length
    return full & ~ragged[None, :, None] & ~ragged[None, None, :]


def block_table(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """[B, H, QB, KB] bool -> (num [B, H, QB] int32, indices [B, H, QB, KB] int32, listed blocks first)."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order


def from_tables(
    partial: Tensor, full: Tensor, mask_mod: Callable, length: int, block: int = BLOCK
) -> BlockMask:
    """BlockMask from partial and full block tables [B, H, QB, KB] over `length` queries and keys.

    seq_lengths = (length, length) where this torch accepts it (length need not be a block multiple).
    """
    seq_lengths = {"seq_lengths": (length, length)} if HAS_SEQ_LENGTHS else {}
    return BlockMask.from_kv_blocks(
        *block_table(partial), *block_table(full), BLOCK_SIZE=block, mask_mod=mask_mod, **seq_lengths
    )


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


RECOMPILE_LIMIT = 64  # compiled variants per function before Dynamo silently runs it eagerly (default 8)


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let each compiled function keep up to `limit` variants. One training step calls the same function
    with and without grad, with online and EMA weights (requires_grad differs), and with batch sizes of
    0/1 (specialized) and larger: past torch's default of 8, Dynamo falls back to eager, which for flex
    attention is the unfused kernel that materializes M x M scores (seen on an H200: 0.56 instead of
    1.28 it/s for the B preset's drop stage)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(config, name, max(getattr(config, name), limit))


@functools.cache
def compiled(kind: str) -> Callable[[Tensor, Tensor, Tensor, BlockMask], Tensor]:
    """flex_attention compiled once per process for one mask kind (an identifier: 'glga_band', 'sla_blocks').

    Each kind runs under a code object of its own, so Dynamo counts its recompiles apart: two backends'
    mask functions sharing one compiled flex exhausted its recompile limit, after which flex falls back
    to the unfused path that materializes M x M scores (seen on an H100). Batch and token counts vary per
    call (objective groups, token dropping), so shapes are left to Dynamo's automatic dynamic marking.
    """
    raise_recompile_limit()
    name = f"flex_{kind}"
    code = _flex.__code__.replace(co_name=name)
    return torch.compile(types.FunctionType(code, _flex.__globals__, name), dynamic=None)


def run(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, kind: str) -> Tensor:
    """flex_attention on [B, H, L, d]: compiled(kind) on CUDA, eager on CPU (the test path, forward only)."""
    if q.is_cuda:
        return compiled(kind)(q, k, v, block_mask)
    with warnings.catch_warnings():  # eager flex on CPU is the test path; its unfused warning is moot
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)
