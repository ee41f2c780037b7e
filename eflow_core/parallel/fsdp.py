"""FSDP2 for the trainer: the model sharded per block and then at the root, and a step around it.

Weights, gradients and AdamW's moments live as shards (DTensors, dim 0 split over the ranks); weights
are gathered for compute (bf16 under bf16 training: MixedPrecisionPolicy) and gradients are
reduce-scattered in fp32. Two ways to run a step (parallel.fsdp_reshard_after_forward):

- false (the default), gather once per step: `begin_step` all-gathers every block's weights, in the
  same order on every rank, and they stay gathered for all of the step's model calls; backward only
  accumulates gradients locally; `reduce_gradients` then reduce-scatters each block's gradient once,
  again in one fixed order, and frees the gathered weights. No collective depends on the model calls,
  so ranks may make different ones: sfm and pdg-sfm skip a pass whose group is empty on a rank (the
  path-dropped samples, say), and a per-call collective would then pair with another rank's unrelated
  one and hang or mix data. Memory: the gathered weights and full local gradients during a step (ZeRO-2).
- true, torchtitan's: a block gathers its weights before each forward and frees them after, gathers
  them again in backward and reduce-scatters its gradient as backward leaves it. Least memory (ZeRO-3),
  but collectives per model call: every rank must make the same calls in the same order (fm does).

The EMA shards like the model (`shard_model` with its weights gathered only on request, in fp32): its
copy is split over the ranks, and each rank updates its own shard from the online model's (no
communication, eflow.train.ema). For a step whose objective calls the EMA (Objective.uses_ema: the SFM
family while MVA is on) `begin_step` gathers it after the online weights, in the same order on every
rank, and `end_forward` frees it before backward; previews and validation gather it on every rank
(`gathered`) and run on rank 0.
Checkpoints are sharded: every rank writes its shards through torch.distributed.checkpoint
(eflow.train.checkpoint.save_sharded_checkpoint) and a resume reshards them over any world size; a
full checkpoint (data parallelism, one process, or `eflow export`) resumes under FSDP too: every rank
loads it whole and keeps its shards (`shard_optimizer_state`), so a run moves between FSDP, data
parallelism and world sizes by its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from eflow.errors import EflowError
from eflow.parallel.parallelize import model_blocks
from eflow.train.distributed import World


def shard_model(
    model: nn.Module, world: World, device: torch.device, *, bf16: bool, reshard_after_forward: bool
) -> None:
    """fully_shard every block, then the root (embeddings, fusion, head), over all ranks, in place."""
    mesh = init_device_mesh(device.type, (world.size,))
    # cast_forward_inputs=False: FSDP would cast the model's float inputs to bf16, times included, and a
    # bf16 t - s cannot hold the small gaps of the SCM and MVA terms; autocast casts what matmuls read.
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in model_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not reshard_after_forward:  # gather once per step (module docstring)
        model.set_reshard_after_forward(False)
        model.set_reshard_after_backward(False)
        model.set_requires_gradient_sync(False)
        if has_unused_params_flag(model):
            model.set_reduce_scatter_unused_params(True)  # a block unused on this rank still takes part
        model._get_fsdp_state()._lazy_init()  # private: the root's shared streams, before `begin_step`


def has_unused_params_flag(model: nn.Module) -> bool:
    """Whether this torch's FSDP2 can reduce-scatter the parameters a rank left unused by itself
    (set_reduce_scatter_unused_params: torch 2.13 has it, 2.11 not); without it ShardedStep gives them
    zero gradients before reducing."""
    return hasattr(model, "set_reduce_scatter_unused_params")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _units(model: nn.Module) -> list[nn.Module]:
    """The sharded modules of a model `shard_model` sharded, in one fixed order on every rank."""
    return [model, *model_blocks(model)]


def gather_weights(model: nn.Module) -> None:
    """All-gather every block's weights and keep them gathered (a collective: every rank calls); the
    model's calls make none until `release_weights`."""
    handles = [module.unshard(async_op=True) for module in _units(model)]
    for handle in handles:
        handle.wait()


def release_weights(model: nn.Module) -> None:
    """Free the gathered weights (`gather_weights`) of a model that runs no backward (the EMA), back to
    this rank's shards; no communication. FSDP2 records every forward for backward's prefetching and
    clears that record at the end of backward, so a model without backward clears it here (with
    FSDPModule.reset_iter_state where torch has it), else it would grow by a block per call."""
    reset = getattr(model, "reset_iter_state", None)
    if reset is not None:
        reset()  # reshards every block and clears the record
        return
    for module in _units(model):
        module.reshard()
    state = model._get_fsdp_state()  # private: the record reset_iter_state clears (torch 2.11 lacks it)
    state._comm_ctx.post_forward_order.clear()
    for module in _units(model):
        for group in _param_groups(module._get_fsdp_state()):
            group._post_forward_indices.clear()


def _param_groups(state) -> list:
    """An FSDP state's parameter groups (a list in newer torch, one optional group in older)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its weights gathered on every rank (all ranks enter), so one rank may run it alone."""
    gather_weights(model)
    try:
        yield model
    finally:
        release_weights(model)


class ShardedStep:
    """What the trainer calls around a step of a model that `shard_model` sharded; `ema`, the EMA sharded
    alike (gathered for the steps whose objective calls it)."""

    def __init__(self, model: nn.Module, *, reshard_after_forward: bool, ema: nn.Module | None = None):
        if not is_sharded(model) or (ema is not None and not is_sharded(ema)):
            raise TypeError("ShardedStep needs a model (and EMA) sharded by shard_model")
        self.model = model
        self.ema = ema
        self.ema_gathered = False
        self.once_per_step = not reshard_after_forward
        self.zero_unused = self.once_per_step and not has_unused_params_flag(model)
        self.modules = _units(model)

    def begin_step(self, gather_ema: bool = False) -> None:
        """Gather every block's weights for the step (gather once per step), then the EMA's if the step
        calls it (Objective.uses_ema: the same answer on every rank); one order on every rank."""
        if self.once_per_step:
            gather_weights(self.model)
        self.ema_gathered = gather_ema and self.ema is not None
        if self.ema_gathered:
            gather_weights(self.ema)

    def end_forward(self) -> None:
        """After the objective's passes, before backward: free the gathered EMA."""
        if self.ema_gathered:
            release_weights(self.ema)
            self.ema_gathered = False

    def reduce_gradients(self) -> None:
        """After backward: reduce-scatter every block's gradient (averaged over ranks, fp32) into its
        shard and free the gathered weights (gather once per step; per-block backward did it already).

        FSDP2 reduces in its post-backward hook, which runs once per forward call. Its end-of-backward
        callback runs that hook for every block in one fixed order, and with gradient sync on it
        reduce-scatters what the step accumulated; that callback is private, hence the check."""
        if not self.once_per_step:
            return
        state = self.model._get_fsdp_state()
        finish = getattr(state, "_root_post_backward_final_callback", None)
        if finish is None:
            raise EflowError(
                f"torch {torch.__version__}: FSDP2 lacks the end-of-backward callback eflow uses to reduce "
                "gradients once per step; set parallel.fsdp_reshard_after_forward = true (objective fm) "
                "or parallel.fsdp = false"
            )
        if self.zero_unused:
            self.zero_unused_gradients()
        self.model.set_requires_gradient_sync(True)
        try:
            finish()
        finally:
            self.model.set_requires_gradient_sync(False)
        for module in self.modules:
            module.reshard()

    def zero_unused_gradients(self) -> None:
        """Give every gathered parameter this rank left unused in the step a zero gradient, so that its
        block's reduce-scatter runs on every rank (what set_reduce_scatter_unused_params does where torch
        has it). A parameter whose gradient FSDP already moved to its fp32 accumulator gets a zero too,
        which FSDP adds to the accumulator before reducing."""
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None and not isinstance(param, DTensor):
                param.grad = torch.zeros_like(param)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the sharded gradients to a total norm of `max_norm`; returns the norm before clipping."""
        params = list(self.model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sums the ranks' squared norms
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    @staticmethod
    def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
        """After optimizer.load_state_dict of a full (unsharded) state: keep each rank's shard of every
        moment, placed like its parameter (no communication: every rank loaded the same file)."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor):
                    continue
                entry = optimizer.state.get(param, {})
                for name, value in entry.items():
                    if (
                        isinstance(value, Tensor)
                        and not isinstance(value, DTensor)
                        and value.shape == param.shape
                    ):
                        entry[name] = distribute_tensor(
                            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                        )
