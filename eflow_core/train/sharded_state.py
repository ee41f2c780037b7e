"""The training state as torch.distributed.checkpoint (DCP) stores it: a sharded checkpoint's dcp/ folder.

One DCP state dict of three parts: "model" and "optim" as DCP's get_state_dict gives them (keyed by
parameter name; under FSDP2 a rank holds DTensor shards and writes only those) and "ema", the EMA's
state dict, sharded like the model under FSDP2. A tensor that several ranks hold whole (a buffer, or
an EMA written before it was sharded) DCP's save planner writes only once.

Loading reshards: `load_state` hands each rank the pieces of its own shards, whatever world size wrote
them; `read_part` reads one part whole into plain CPU tensors in a single process, without a process
group (sampling, export, a resume without FSDP).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.optim import Optimizer

MODEL, OPTIM, EMA = "model", "optim", "ema"  # the parts of the state dict


def _parts(model: nn.Module, optimizer: Optimizer, ema: nn.Module) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {MODEL: model_state, OPTIM: optim_state, EMA: ema.state_dict()}


@contextmanager
def _unwrapped() -> Iterator[None]:
    """Raise what a rank raised, not DCP's CheckpointException around every rank's failure (a
    BaseException, which a caller's `except OSError` for a full disk would not see)."""
    try:
        yield
    except CheckpointException as err:
        raise err.failures[min(err.failures)][0] from None


def _alone() -> bool:
    """Whether this process saves or loads by itself (no process group)."""
    return not (dist.is_available() and dist.is_initialized())


def save_state(directory: Path, model: nn.Module, optimizer: Optimizer, ema: nn.Module) -> None:
    """Write this rank's share of model, optimizer and EMA into `directory` (a collective under a
    process group: every rank calls)."""
    with _unwrapped():
        dcp.save(_parts(model, optimizer, ema), storage_writer=FileSystemWriter(directory), no_dist=_alone())


def load_state(directory: Path, model: nn.Module, optimizer: Optimizer, ema: nn.Module) -> None:
    """Load model, optimizer and EMA from `directory` in place, each rank the pieces its shards need
    (a collective under a process group). The optimizer's moments are created first if it has taken no
    step yet (get_state_dict runs one step of zero gradients at learning rate 0), then overwritten."""
    state = _parts(model, optimizer, ema)
    with _unwrapped():
        dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=_alone())
    set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIM])
    ema.load_state_dict(state[EMA])


def saved_shapes(directory: Path, part: str) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor of `part` ("model" or "ema") in `directory`, from DCP's metadata."""
    metadata = FileSystemReader(directory).read_metadata()
    prefix = f"{part}."
    return {
        key.removeprefix(prefix): tuple(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }


def read_part(directory: Path, part: str) -> dict:
    """One part of the state in `directory`, whole, as plain CPU tensors, read by this process alone
    (no process group needed, none used). "optim" comes keyed by parameter name (optimizer_by_index)."""
    state: dict = {}
    # torch.distributed.checkpoint.format_utils.dcp_to_torch_save's reading, restricted to one part
    with _unwrapped():
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(directory),
            planner=_EmptyStateDictLoadPlanner(keys={part}),
            no_dist=True,
        )
    return state[part]


def optimizer_by_index(optim: dict) -> dict:
    """The "optim" part (state keyed by parameter name) in optimizer.state_dict()'s layout: parameters
    numbered in the order of the parameter groups, as a plain optimizer numbers them."""
    names = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {
        i: optim["state"][name] for i, name in enumerate(names) if name in optim["state"]
    }
    groups = [
        {**group, "params": [index[name] for name in group["params"]]} for group in optim["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
