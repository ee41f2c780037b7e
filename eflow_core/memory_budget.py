"""Fail fast on sizes: a lower bound of the memory a run or a sampling batch needs, checked before
anything big is allocated.

The bound counts only what must exist at once, so a request it refuses cannot fit (it may still
under-count what a request that passes needs):
- training: weights, EMA, gradients and AdamW's two moments (20 bytes per fp32 parameter); one batch of
  clips in float32; and, per block, what autograd keeps for the backward pass: at least the block's
  input, q, k, v, the attention output and the FFN hidden activations, (5 D + F) values per token.
  A checkpointed block (parallel.ac) keeps only its input, D values per token, and rebuilds the rest
  in backward, one block at a time: (4 D + F) more per token while the last checkpointed one does;
- sampling: the weights; one batch of latents and, for the widest block, (5 D + F) values per token;
  the decoded videos in float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from eflow.errors import EflowError

GiB = 1024**3


@dataclass
class MemoryNeed:
    """Named lower bounds in bytes (what the refusal message lists)."""

    what: str  # "training" or "sampling"
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items() if size)


def gib(size: float) -> str:
    """Bytes as a short GiB string."""
    return f"{size / GiB:.3g} GiB" if size >= 0.01 * GiB else f"{size / 1024**2:.3g} MiB"


def device_memory(device: torch.device) -> int | None:
    """Total bytes of the device (GPU memory, or this machine's RAM for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _activation_values_per_token(model: nn.Module) -> int:
    """(5 D + F): a block's input, q, k, v, attention output and FFN hidden, per token."""
    spec = model.spec
    return 5 * spec.dim + spec.ffn_dim


def kept_activations(block_tokens: list[int], dim: int, full: int, checkpoint_every: int = 0) -> int:
    """Values autograd holds at once for the blocks' backward: per token, `full` (5 D + F) for a plain
    block and `dim` (its input) for a checkpointed one (blocks 0, n, 2n, ... for checkpoint_every = n;
    0 = none). Backward recomputes a checkpointed block while the blocks before it still hold theirs,
    and when it reaches the last one the plain blocks after it have freed theirs: the larger of the two
    moments is the bound."""
    checkpointed = [checkpoint_every > 0 and i % checkpoint_every == 0 for i in range(len(block_tokens))]
    kept = [n * (dim if c else full) for n, c in zip(block_tokens, checkpointed, strict=True)]
    need = sum(kept)
    if any(checkpointed):
        last = max(i for i, c in enumerate(checkpointed) if c)
        need = max(need, sum(kept[: last + 1]) + block_tokens[last] * (full - dim))
    return need


def training_need(
    model: nn.Module,
    clip_shape: tuple[int, int, int],
    latent_shape: tuple[int, ...],
    batch_size: int,
    bf16: bool,
    middle_keep: float = 1.0,
    checkpoint_every: int = 0,
    shards: int = 1,
    sequence_shards: int = 1,
) -> MemoryNeed:
    """Lower bound for one training step of `batch_size` clips (frames, height, width); the middle blocks
    see `middle_keep` of the tokens (1 - the smallest drop ratio of the schedule); checkpoint_every: the
    blocks under activation checkpointing (ParallelSection.checkpoint_every: 0 none, 1 all, n every n-th);
    shards: ranks FSDP splits the training state over (1 without FSDP); sequence_shards: ranks a block's
    tokens are split over (parallel.sp; the all-to-all gives each rank all tokens of 1/sp of the heads,
    the same count of values)."""
    tokens = math.ceil(math.prod(model.token_grid(latent_shape)) / sequence_shards)
    spec = model.spec
    kept_tokens = math.ceil(tokens * middle_keep)
    block_tokens = (
        [tokens] * spec.encoder_blocks + [kept_tokens] * spec.middle_blocks + [tokens] * spec.decoder_blocks
    )
    act_bytes = 2 if bf16 else 4
    return MemoryNeed(
        "training",
        {
            # weights, EMA, gradients and AdamW's moments are split over `shards` ranks under FSDP
            "weights + EMA + gradients + AdamW moments": (20 * _params(model)) // shards,
            "one batch of clips": batch_size * 3 * math.prod(clip_shape) * 4,
            "activations kept for backward": batch_size
            * act_bytes
            * kept_activations(block_tokens, spec.dim, _activation_values_per_token(model), checkpoint_every),
        },
    )


def sampling_need(
    model: nn.Module,
    clip_shape: tuple[int, int, int],
    latent_shape: tuple[int, ...],
    batch_size: int,
    bf16: bool,
) -> MemoryNeed:
    """Lower bound for sampling one batch of `batch_size` videos."""
    tokens = math.prod(model.token_grid(latent_shape))
    act_bytes = 2 if bf16 else 4
    return MemoryNeed(
        "sampling",
        {
            "weights": 4 * _params(model),
            "latents": 2 * batch_size * math.prod(latent_shape) * 4,
            "one block's activations": batch_size * tokens * _activation_values_per_token(model) * act_bytes,
            "decoded videos": batch_size * 3 * math.prod(clip_shape) * 4,
        },
    )


def check_fits(need: MemoryNeed, device: torch.device, hint: str) -> None:
    """Refuse, in one line, a request whose lower bound exceeds the device's total memory."""
    have = device_memory(device)
    if have is None or need.total <= have:
        return
    where = (
        "this machine's RAM" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    )
    raise EflowError(
        f"{need.what} needs at least {gib(need.total)} ({need.describe()}) but {where} has {gib(have)}; "
        f"{hint}"
    )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure: CUDA OOM, MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def out_of_memory_message(err: BaseException, doing: str, hint: str) -> str:
    """One line for an allocation failure that the lower bound let through."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"out of memory {doing} ({first[:200]}); {hint}"
