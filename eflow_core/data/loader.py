"""The training loader: a torch DataLoader over step numbers whose workers build whole step batches.

    for batch in StepLoader(batches, start=k0, stop=total, workers=2, pin_memory=True):
        batch["step"]  # k0, k0 + 1, ... in order; the rest as StepBatches.get(step) returns it

The DataLoader's sampler is the range of steps [start, stop); item k of its dataset is
StepBatches.get(k), built inside a worker (readers are created there, after the fork). So the data of
a step is the same whatever the number of workers, and a run resumed at step k0 starts its sampler at
k0: no step's data is replayed or skipped. Workers are persistent, prefetch two steps each, and run
torch single-threaded (they decode and resize; the main process trains). Starting an iteration draws
nothing from torch's global RNG (the DataLoader gets a private generator), so the training step's
seeded draws are the same with any number of workers. With pin_memory (on CUDA)
batches arrive in page-locked memory so the host-to-device copy can be asynchronous.

workers = 0 loads in the main process (no subprocesses). `auto_workers` picks the default: 0 for
datasets that compute their items (a dataset without `reads_files = True`, e.g. `shapes`), else
min(8, max(1, CPU cores // 2)).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from eflow.data.batches import StepBatches


class _StepDataset(Dataset):
    """Item k = the collated batch of optimizer step k."""

    def __init__(self, batches: StepBatches, stop: int):
        self.batches, self.stop = batches, stop

    def __len__(self) -> int:
        return self.stop

    def __getitem__(self, step: int) -> dict:
        return self.batches.get(step)


def _single_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def _as_is(batch: dict) -> dict:
    return batch


def auto_workers(datasets) -> int:
    """Default worker count: 0 unless some dataset reads files."""
    if not any(getattr(ds, "reads_files", False) for ds in datasets):
        return 0
    return min(8, max(1, (os.cpu_count() or 2) // 2))


class StepLoader:
    """Batches of steps [start, stop), in order, through a DataLoader (see the module docstring)."""

    def __init__(self, batches: StepBatches, start: int, stop: int, *, workers: int = 0, pin_memory=False):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.start, self.stop, self.workers = start, stop, workers
        self.loader = DataLoader(
            _StepDataset(batches, stop),
            batch_size=None,
            sampler=range(start, stop),
            num_workers=workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=_single_thread if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),  # a private one: the global RNG is not touched
        )

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)
