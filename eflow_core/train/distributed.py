"""torch.distributed under torchrun: rank/world from the environment, gradient averaging across ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from eflow.errors import EflowError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device, timeout: timedelta | None = None) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a single process needs none.
    timeout: how long a collective may wait for the slowest rank (None: torch's default)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(model: nn.Module, world: World) -> None:
    """Data parallel: all-reduce the flattened gradients and divide by the world size.

    Objectives call the model several times per step (full and weak paths, with and without grad), which
    torch's DDP wrapper does not allow before one backward; averaging after backward is equivalent for
    the update. Parameters without a gradient on this rank count as zeros, so every rank reduces the same
    buffer (no hang when the weak path leaves the middle stack unused on one rank).
    """
    if world.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(model: nn.Module, world: World) -> None:
    """Start every rank from rank 0's weights."""
    if world.size == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def all_mean(value: float, world: World, device: torch.device) -> float:
    """Mean of a scalar over ranks (for logging)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank must call). A decision that leads to collectives,
    such as stopping after this step and saving, must be the same on every rank."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def on_main(work: Callable[[], T], world: World) -> T:
    """work() on rank 0, its result (any picklable value) handed to every rank; every rank must call.
    When it fails, every rank raises: rank 0 its own exception, the others an EflowError naming it, so
    no rank waits for a collective that rank 0 will never join."""
    if world.size == 1:
        return work()
    box: list = [None, None]  # [result, failure]
    error = None
    if world.is_main:
        try:
            box[0] = work()
        except BaseException as err:
            box[1], error = _failure(err), err
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise EflowError(f"rank 0 failed: {box[1]}")
    return box[0]


def on_every_rank(work: Callable[[], T], world: World) -> list[T]:
    """work() on every rank, every rank's result (in rank order) handed to every rank; every rank must
    call. When it fails on any rank, every rank raises (that rank its own exception)."""
    if world.size == 1:
        return [work()]
    error = None
    try:
        mine = (work(), None)
    except BaseException as err:
        mine, error = (None, _failure(err)), err
    results: list = [None] * world.size
    dist.all_gather_object(results, mine)
    if error is not None:
        raise error
    for rank, (_, failure) in enumerate(results):
        if failure is not None:
            raise EflowError(f"rank {rank} failed: {failure}")
    return [result for result, _ in results]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
