"""Ulysses sequence parallelism (DeepSpeed-Ulysses) for the VideoDiT, applied from outside the model.

The sp ranks of a group (the "sp" dimension of a (dp, sp) DeviceMesh) run one batch together. Each
stack of blocks (encoder, middle, decoder) holds the tokens it sees split over them: its first block
cuts the zero-padded sequence into sp shards of m = ceil(M / sp) tokens and keeps this rank's, its last
block gathers the shards again. Everything per token (norms, AdaLN modulation, cross-attention to the
text, the FFN) runs on the shard. Around self-attention:

    q, k, v = project(shard)              [B, m, H, d]      RoPE at the shard's own positions
    all-to-all: sequence -> heads          [B, sp m, H/sp, d]  -> drop the padding -> [B, M, H/sp, d]
    o = attend(q, k, v, ctx, x)            [B, M, H/sp, d]   the backend, unchanged, on every token
    pad, all-to-all: heads -> sequence     [B, m, H, d]      -> proj

So `attend` sees exactly the tokens and TokenContext of a run without sequence parallelism, for the
heads this rank owns; padding never reaches it, which is why any token count works, and why every
backend whose `attend` treats heads independently works unchanged. A backend that reads x (a gate,
capability attend_reads_x) gets the block's tokens all-gathered; one with per-head parameters serves
its heads through SelfAttention.for_heads. Between the stacks (the middle stack's token gather,
[MASK] restore, fusion, head) the model runs whole and replicated on every rank of the group.

Every rank of a group must get the same batch and the same random draws, so that what runs replicated
is identical (data_parallel_world gives the trainer the rank and size to slice data and seed by); the
first forward checks it.

Gradients. The loss is then the same on every rank of a group. A stack's last block gathers in forward
and, in backward, keeps its own shard of the gradient times sp; its first block takes its shard in
forward and, in backward, gathers the shards' gradients divided by sp. With that every parameter's true
gradient is the MEAN over the group of the ranks' local gradients: a weight used inside the stacks
(partial on each rank) and a weight used replicated (complete on each rank) alike. So averaging over all
ranks of the job, as data parallelism (eflow.train.distributed.average_gradients) and FSDP do anyway,
is right as it stands; average_sequence_gradients averages over the sp group alone.

With parallel.compile the collectives stay eager (torch.compiler.disable) and each block compiles as
the pieces between them: traced into the block's graph, Inductor (torch 2.13, CPU, dynamic shapes) failed
a stride check in the all-to-all's backward. Their results are waited on at once (wait_tensor), so no
AsyncCollectiveTensor enters a compiled graph: one that did got wrong gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from eflow.errors import ConfigError, EflowError
from eflow.model.feed_forward import FeedForward
from eflow.model.flex import FAR, pad_tokens
from eflow.model.self_attention import SelfAttention
from eflow.model.tokens import TokenContext
from eflow.registry import get_registry
from eflow.train.distributed import World

MESH_DIMS = ("dp", "sp")
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


# ----- the group ------------------------------------------------------------------------------------
def sequence_mesh(world: World, sp: int, device_type: str) -> DeviceMesh:
    """The (dp, sp) mesh of the job: sp consecutive ranks share a batch (fast links within a node)."""
    if world.size % sp:
        raise ConfigError(
            f"parallel.sp = {sp} must divide the number of processes ({world.size}): run torchrun with "
            f"a multiple of {sp} processes"
        )
    return init_device_mesh(device_type, (world.size // sp, sp), mesh_dim_names=MESH_DIMS)


def data_parallel_world(world: World, sp: int) -> World:
    """This rank's place among the data-parallel replicas: rank // sp of size // sp (local_rank kept).
    The trainer slices the global batch and seeds a step's draws by it, so that the sp ranks of a group
    see the same batch and the same noise, times and dropped tokens."""
    if world.size % sp:
        raise ConfigError(f"parallel.sp = {sp} must divide the number of processes ({world.size})")
    return World(world.rank // sp, world.size // sp, world.local_rank)


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share one batch's tokens: their process group, this rank's place, how many."""

    group: dist.ProcessGroup
    rank: int
    size: int

    @staticmethod
    def of(mesh: DeviceMesh | dist.ProcessGroup) -> SequenceGroup:
        """From a (dp, sp) mesh (its "sp" dimension), a 1-D mesh, or a process group."""
        if isinstance(mesh, DeviceMesh):
            if mesh.ndim > 1:
                mesh = mesh["sp"]
            group = mesh.get_group()
        else:
            group = mesh
        return SequenceGroup(group, dist.get_rank(group), dist.get_world_size(group))


def check_heads(heads: int, sp: int, where: str) -> None:
    """Ulysses gives each rank heads / sp whole heads: refuse an sp that does not divide them."""
    if heads % sp:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ConfigError(
            f"parallel.sp = {sp} must divide the attention heads: {where} has {heads} heads; "
            f"choose sp in {divisors}"
        )


def check_model(model: nn.Module, sp: int) -> None:
    """Refuse what sequence parallelism cannot run exactly: heads that sp does not divide, and blocks
    whose FFN mixes tokens (Sana's Mix-FFN convolves over the token grid, which a shard does not hold)."""
    check_heads(model.spec.heads, sp, f"the model (dim {model.spec.dim})")
    for block, name in zip(model.blocks(), model.block_attention, strict=True):
        if not isinstance(block.attn, SelfAttention):
            raise ConfigError(
                f"parallel.sp = {sp}: attention '{name}' is a {type(block.attn).__name__}, not a "
                "SelfAttention (eflow.api), so it has no project / attend seam to split at; set "
                "parallel.sp = 1 for this backend"
            )
        if not isinstance(block.ffn, FeedForward):
            raise ConfigError(
                f"parallel.sp = {sp}: attention '{name}' builds its blocks' FFN as "
                f"{type(block.ffn).__name__}, which reads neighbouring tokens on the grid (convolutions); "
                "a sequence shard does not hold them. Sequence parallelism needs the token-wise FFN "
                "(every backend but sana); set parallel.sp = 1 for this backend"
            )


# ----- the shard of a context -----------------------------------------------------------------------
@dataclass(kw_only=True)
class SequenceShard(TokenContext):
    """The context of the m tokens this rank holds: shard `group.rank` of `full`'s tokens zero-padded
    to size * m. index and rope are the shard's (padding: raster index FAR, angle 0); `full`, the whole
    context, which `attend` receives, is an attribute and not a field: full's cache holds this shard,
    and what walks a block's arguments field by field (FSDP's hooks) must not go round that loop."""

    group: SequenceGroup

    @property
    def length(self) -> int:
        """m: tokens per shard (padding included)."""
        return self.index.shape[1]

    @property
    def total(self) -> int:
        """M: the real tokens of the whole sequence."""
        return self.full.index.shape[1]

    @staticmethod
    def of(ctx: TokenContext, group: SequenceGroup) -> SequenceShard:
        """This rank's shard of `ctx`, built once per context (a forward's blocks share it)."""

        def build() -> SequenceShard:
            total = ctx.index.shape[1]
            m = -(-total // group.size)
            lo, padded = group.rank * m, group.size * m
            index = F.pad(ctx.index, (0, padded - total), value=FAR)[:, lo : lo + m]  # [B, m]
            rope = pad_tokens(ctx.rope, padded)[:, lo : lo + m]  # [B, m, d / 2]
            shard = SequenceShard(ctx.grid, index, rope, ctx.dropped, group=group)
            shard.full = ctx  # an attribute, not a field (class docstring)
            return shard

        return ctx.cached(("sequence_shard", group.rank, group.size), build)


# ----- collectives ----------------------------------------------------------------------------------
def _gather_tokens_raw(x: Tensor, group: SequenceGroup) -> Tensor:
    """All-gather [B, m, ...] shards along the tokens -> [B, size * m, ...] (no autograd)."""
    out = x.new_empty(group.size * x.shape[0], *x.shape[1:])  # gloo wants the ranks concatenated on dim 0
    dist.all_gather_into_tensor(out, x.contiguous(), group=group.group)
    return out.unflatten(0, (group.size, -1)).transpose(0, 1).flatten(1, 2)


class _SplitSequence(torch.autograd.Function):
    """Replicated [B, M, ...] -> this rank's shard [B, m, ...] of the zero-padded sequence.
    Backward: the shards' gradients gathered, the padding dropped, divided by sp (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shard: SequenceShard) -> Tensor:
        ctx.shard = shard
        lo = shard.group.rank * shard.length
        return pad_tokens(x, shard.group.size * shard.length)[:, lo : lo + shard.length].clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        shard = ctx.shard
        full = _gather_tokens_raw(grad, shard.group)[:, : shard.total]
        return full / shard.group.size, None


class _GatherSequence(torch.autograd.Function):
    """This rank's shard [B, m, ...] -> the whole sequence [B, M, ...], replicated on the group.
    Backward: this rank's shard of the (replicated) gradient times sp (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shard: SequenceShard) -> Tensor:
        ctx.shard = shard
        return _gather_tokens_raw(x, shard.group)[:, : shard.total]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        shard = ctx.shard
        lo = shard.group.rank * shard.length
        mine = pad_tokens(grad, shard.group.size * shard.length)[:, lo : lo + shard.length]
        return mine * shard.group.size, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on contiguous: the functional collectives' backward runs
    the reverse collective on the gradient of their output, which NCCL refuses when it is not contiguous
    (a permute after the collective makes it so; gloo accepts it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def split_sequence(x: Tensor, shard: SequenceShard) -> Tensor:
    """[B, M, D] (the same on every rank of the group) -> this rank's [B, m, D]."""
    return _SplitSequence.apply(x, shard)


def gather_sequence(x: Tensor, shard: SequenceShard) -> Tensor:
    """This rank's [B, m, D] -> [B, M, D], the same on every rank of the group."""
    return _GatherSequence.apply(x, shard)


@torch.compiler.disable  # eager under torch.compile (module docstring)
def sequence_to_heads(qkv: Tensor, shard: SequenceShard) -> Tensor:
    """All-to-all: [3, B, m, H, d] (this rank's tokens, every head) -> [3, B, M, H/sp, d] (every real
    token, this rank's heads: head group `rank`). Autograd: the backward is the reverse all-to-all."""
    g = shard.group
    heads = qkv.shape[3]
    send = qkv.unflatten(3, (g.size, heads // g.size)).permute(3, 0, 1, 2, 4, 5)  # [sp, 3, B, m, H/sp, d]
    got = funcol.all_to_all_single_autograd(send.contiguous(), None, None, g.group)  # [sp(from), ...]
    got = _ContiguousGrad.apply(funcol.wait_tensor(got))  # a plain tensor from here on (module docstring)
    got = got.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [3, B, sp m, H/sp, d]
    return got[:, :, : shard.total]


@torch.compiler.disable  # eager under torch.compile (module docstring)
def heads_to_sequence(o: Tensor, shard: SequenceShard) -> Tensor:
    """All-to-all: [B, M, H/sp, d] (every token, this rank's heads) -> [B, m, H, d] (this rank's tokens,
    every head); the padding is zeros on the way."""
    g = shard.group
    o = pad_tokens(o, g.size * shard.length).unflatten(1, (g.size, shard.length))  # [B, sp, m, H/sp, d]
    send = o.permute(1, 0, 2, 3, 4)  # [sp(to), B, m, H/sp, d]
    got = funcol.all_to_all_single_autograd(send.contiguous(), None, None, g.group)  # [sp(head group), ...]
    got = _ContiguousGrad.apply(funcol.wait_tensor(got))
    return got.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B, m, H, d]


@torch.compiler.disable  # eager under torch.compile (module docstring)
def gather_tokens(x: Tensor, shard: SequenceShard) -> Tensor:
    """All-gather [B, m, D] -> [B, M, D] inside a stack (each rank then uses it for its own heads, so
    the backward sums the ranks' gradients: a reduce-scatter)."""
    whole = _ContiguousGrad.apply(
        funcol.wait_tensor(_all_gather(x.transpose(0, 1).contiguous(), 0, shard.group.group))
    )  # [sp m, B, D]
    return whole.transpose(0, 1)[:, : shard.total]


def check_replicated(x: Tensor, group: SequenceGroup) -> None:
    """Refuse inputs that differ between the ranks of a group (the trainer must give them one batch and
    one set of draws): two checksums of x compared across the group, every rank raising alike."""
    stats = torch.stack([x.detach().float().sum(), x.detach().float().abs().sum()])
    every = stats.new_empty(group.size * 2)
    dist.all_gather_into_tensor(every, stats, group=group.group)
    every = every.view(group.size, 2)
    scale = every[:, 1].abs().max().clamp(min=1e-12)
    if ((every - every[0]).abs() > 1e-4 * scale).any():
        raise EflowError(
            f"sequence parallelism: the {group.size} ranks of a group got different inputs (checksums "
            f"{every[:, 0].tolist()}); every rank of an sp group must see the same batch and the same random "
            "draws: slice the data and seed each step by eflow.parallel.sequence.data_parallel_world"
        )


# ----- wrapping the blocks --------------------------------------------------------------------------
def _sharded_attention(attn: nn.Module, heads: nn.Module, reads_x: bool) -> Callable[..., Tensor]:
    """The forward of a SelfAttention under Ulysses (module docstring); a plain TokenContext (a caller
    outside the model's blocks) runs the original forward."""
    forward = attn.forward
    who = getattr(attn, "registered_as", "") or f"attention backend {type(attn).__qualname__}"

    @functools.wraps(forward)
    def run(x: Tensor, ctx: TokenContext) -> Tensor:
        if not isinstance(ctx, SequenceShard):
            return forward(x, ctx)
        q, k, v = attn.project(x, ctx)  # [B, m, H, d] each, RoPE at the shard's positions
        q, k, v = sequence_to_heads(torch.stack([q, k, v]), ctx).unbind(0)  # [B, M, H/sp, d] each
        o = heads.attend(q, k, v, ctx.full, gather_tokens(x, ctx) if reads_x else x)  # [B, M, H/sp, d]
        if o.shape != q.shape:
            raise EflowError(
                f"{who} under sequence parallelism: attend() on heads {tuple(q.shape)} returned "
                f"{tuple(o.shape)}; a backend with per-head parameters must serve a slice of its heads "
                "through SelfAttention.for_heads"
            )
        return attn.proj(heads_to_sequence(o, ctx).flatten(2))  # [B, m, D]

    return run


def _sharded_block(
    forward: Callable[..., Tensor], group: SequenceGroup, first: bool, last: bool, state: dict
) -> Callable[..., Tensor]:
    """A block's forward on this rank's shard: the first block of a stack splits the sequence, the last
    gathers it; the block itself receives the SequenceShard as its context."""

    @functools.wraps(forward)
    def run(
        x: Tensor, mod: Tensor, ctx: TokenContext, text: Tensor | None = None, text_mask: Tensor | None = None
    ) -> Tensor:
        shard = SequenceShard.of(ctx, group)
        if first:
            if not state["checked"]:
                check_replicated(x, group)
                state["checked"] = True
            x = split_sequence(x, shard)  # [B, m, D]
        y = forward(x, mod, shard, text, text_mask)
        return gather_sequence(y, shard) if last else y

    return run


def apply_sequence_parallel(model: nn.Module, mesh: DeviceMesh | dist.ProcessGroup) -> nn.Module:
    """Ulysses over `mesh`'s "sp" dimension (or a process group), in place: every block runs on this
    rank's shard of the tokens, its self-attention on this rank's heads of every token. Parameter names
    and state dicts are unchanged. Apply once, after any copy of the model is taken."""
    group = SequenceGroup.of(mesh)
    if getattr(model, "_sequence_group", None) is not None:
        raise EflowError("sequence parallelism is applied to this model already")
    if group.size == 1:
        return model
    check_model(model, group.size)
    registry = get_registry("attention")
    per_rank = model.spec.heads // group.size
    lo, hi = group.rank * per_rank, (group.rank + 1) * per_rank
    state = {"checked": False}  # the first forward checks that the group's inputs agree
    names = iter(model.block_attention)  # the backend of each block, in global order
    for stack in (model.encoder, model.middle, model.decoder):
        for i, block in enumerate(stack):
            attn, reads_x = block.attn, registry.get(next(names)).capability("attend_reads_x")
            attn.forward = _sharded_attention(attn, attn.for_heads(lo, hi), reads_x)
            block.forward = _sharded_block(block.forward, group, i == 0, i == len(stack) - 1, state)
    model._sequence_group = group
    return model


def average_sequence_gradients(model: nn.Module, mesh: DeviceMesh | dist.ProcessGroup) -> None:
    """After backward: each gradient averaged over the sp group, which makes it the gradient of the
    batch the group ran (module docstring). Averaging over all ranks of the job does this and the
    data-parallel average at once (average_gradients, FSDP); this is the sp part alone. A parameter
    unused in the step counts as zeros, so every rank reduces the same buffer."""
    group = SequenceGroup.of(mesh)
    if group.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group.group)
    flat /= group.size
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
