"""parallelize(model, cfg.parallel, world, device): what the trainer applies to the model from outside
it, in torchtitan's order: activation checkpointing, then torch.compile per block, then Ulysses sequence
parallelism (sp > 1: eflow.parallel.sequence), then FSDP2 (per block, then the root).

The model file stays a model. A block is wrapped where it sits: its `forward` is replaced on the
instance (the module's hooks, FSDP's included, still run around it), so parameter names, state dicts
and checkpoints are the same under every option, and a run may resume with other options. Apply it to
a model once, after any copy of it is taken (a copy would share the wrapped forwards): the trainer
copies the EMA first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from eflow.model.flex import raise_recompile_limit
from eflow.parallel.config import ParallelSection
from eflow.train.distributed import World


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in global order: encoder, middle, decoder."""
    return [*model.encoder, *model.middle, *model.decoder]


def checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` under non-reentrant activation checkpointing: autograd keeps the block's inputs and
    recomputes everything else in backward. Arguments may be any objects (the TokenContext, None text).
    Without grad (EMA targets, no-grad passes) it is `forward` itself."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelSection) -> None:
    """Checkpoint the blocks cfg.checkpointed(i) selects (all of them for ac = full)."""
    for i, block in enumerate(model_blocks(model)):
        if cfg.checkpointed(i):
            block.forward = checkpointed(block.forward)


def apply_compile(model: nn.Module) -> None:
    """torch.compile every block's forward (around its checkpointing, as torchtitan does).

    Shapes: the batch and token sizes of a block's inputs (the batch of an objective's group, the kept
    tokens) are marked dynamic before each call, so its first compilation covers every value; any other
    size that changes (a caption length) is left to Dynamo's automatic dynamic marking (dynamic=None, as
    eflow.model.flex does for flex attention): recompiled once as symbolic. 0 and 1 stay specialized.
    dynamic=True would also make every static size symbolic (the grid, the head width) and lose kernels
    specialized to them.
    """
    raise_recompile_limit()
    options = inductor_options()
    for block in model_blocks(model):
        block.forward = dynamic_batch_and_tokens(torch.compile(block.forward, dynamic=None, options=options))


def inductor_options() -> dict[str, Any]:
    """Inductor settings of the compiled blocks (torch.compile's `options`, for those graphs alone: eager
    code and other compiled functions keep Inductor's defaults): mix-order reduction off. On by default on
    CUDA since torch 2.10, it fuses a norm's per-token and per-channel backward reductions into one
    kernel, and upstream reports it returning wrong gradients for adaLN-modulated norms at batch 1
    (pytorch/pytorch#193061, silent) or gradients of the wrong shape (#178080). Compiled XL blocks showed
    both on an H200 with torch 2.11, on the steps with a one-sample call: gradient norms of ~1e6 with the
    fused GLGA inlined, "invalid gradient ... got [1152] but expected [1, 1, 1152]" with it kept out of
    the block's graph. With it off, the same runs' gradient norms match eager's step for step (one H200,
    2026-12-01; docs/scaling.md). It is a speed optimization only: off, the kernels are unfused."""
    if not hasattr(torch._inductor.config.triton, "mix_order_reduction"):  # absent before torch 2.10
        return {}
    return {"triton.mix_order_reduction": False}


def dynamic_batch_and_tokens(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` with the batch and token sizes of its inputs marked dynamic before every call, so the
    first call compiles them as symbolic sizes instead of a later call recompiling (one compilation
    less per variant: gradient on or off, GLGA or softmax, EMA or online)."""

    @functools.wraps(compiled)
    def run(x, mod, ctx, *args: Any, **kwargs: Any) -> Any:
        for tensor, dims in ((x, (0, 1)), (mod, (0,)), (ctx.index, (0, 1)), (ctx.rope, (0, 1))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(x, mod, ctx, *args, **kwargs)

    return run


def parallelize(
    model: nn.Module,
    cfg: ParallelSection,
    world: World,
    device: torch.device,
    *,
    bf16: bool = False,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """`model` with cfg's activation checkpointing, per-block compile, sequence parallelism (sp > 1) and
    (world size > 1) FSDP2 applied, in place; bf16: gather the weights as bf16 for compute (FSDP's
    MixedPrecisionPolicy); mesh: the (dp, sp) mesh of sequence_mesh, built here when not given."""
    if cfg.sp > 1:
        from eflow.parallel.sequence import check_model

        check_model(model, cfg.sp)  # before any wrapping or collective
    apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model)
    if cfg.sp > 1:
        from eflow.parallel.sequence import apply_sequence_parallel, sequence_mesh

        apply_sequence_parallel(
            model, mesh if mesh is not None else sequence_mesh(world, cfg.sp, device.type)
        )
    if cfg.fsdp and world.size > 1:
        from eflow.parallel.fsdp import shard_model

        shard_model(model, world, device, bf16=bf16, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return model
