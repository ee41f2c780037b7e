"""Real clips for evaluation: a seeded subset of a dataset, read batch by batch as uint8.

The subset of `num` clips is the first `num` entries of torch.randperm(len(dataset)) under a
generator seeded with `seed`, so the same (dataset, seed, num) always gives the same clips, and a
smaller num is a prefix of a larger one. `split_indices` cuts one permutation into disjoint parts
(the classifier's held-out and training clips, two real splits for a sanity check).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from eflow.errors import EflowError
from eflow.eval.extractor import to_uint8


def split_indices(length: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Disjoint index lists of the given sizes from one seeded permutation of range(length)."""
    if sum(sizes) > length:
        raise EflowError(
            f"asked for {sum(sizes)} clips ({' + '.join(map(str, sizes))}) but the dataset has {length}"
        )
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


def subset_indices(length: int, num: int, seed: int) -> list[int]:
    """`num` seeded indices (all of them, permuted, if the dataset is smaller)."""
    return split_indices(length, [min(num, length)], seed)[0]


def clip_batches(dataset, indices: Sequence[int], batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield (uint8 videos [B, C, T, H, W], labels [B] or None) for the items at `indices`."""
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        videos = to_uint8(torch.stack([it["video"] for it in items]))
        labels = (
            torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
            if "label" in items[0]
            else None
        )
        yield videos, labels


def load_clips(dataset, indices: Sequence[int], batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
    """All clips at `indices` in memory: uint8 [N, C, T, H, W] and labels [N] (or None)."""
    videos, labels = [], []
    for v, y in clip_batches(dataset, indices, batch_size):
        videos.append(v)
        if y is not None:
            labels.append(y)
    return torch.cat(videos), (torch.cat(labels) if labels else None)
