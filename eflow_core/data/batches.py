"""Deterministic batches: the clips of step k on rank r depend only on (seed, k, r), so resume is exact."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from eflow.condition import Condition


class StepBatches:
    """Walks the dataset in a fresh seeded permutation per epoch; each rank takes its slice of the step."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the number of processes ({world})"
            )
        self.dataset = dataset
        self.global_batch = batch_size
        self.local_batch = batch_size // world
        self.seed = seed
        self.rank = rank
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's share of optimizer step `step`."""
        n = len(self.dataset)
        start = step * self.global_batch + self.rank * self.local_batch
        out = []
        for pos in range(start, start + self.local_batch):
            out.append(int(self._permutation(pos // n)[pos % n]))
        return out

    def get(self, step: int) -> dict:
        """{"video": [B, C, T, H, W], "label": [B] long, "caption": list[str]} for this rank."""
        items = [self.dataset[i] for i in self.indices(step)]
        batch = {"video": torch.stack([it["video"] for it in items])}
        if "label" in items[0]:
            batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
        if "caption" in items[0]:
            batch["caption"] = [it["caption"] for it in items]
        return batch


class Conditioner:
    """Turns a batch's labels or captions into a Condition (captions through a text encoder)."""

    def __init__(self, kind: str, text_encoder=None):
        if kind == "text" and text_encoder is None:
            raise ValueError("text conditioning needs a text encoder")
        self.kind = kind
        self.text_encoder = text_encoder

    def __call__(self, batch: dict, device: torch.device) -> Condition:
        if self.kind == "label":
            if "label" not in batch:
                raise ValueError("the dataset yields no 'label'; use data.condition = 'text'")
            return Condition(labels=batch["label"].to(device))
        if "caption" not in batch:
            raise ValueError("the dataset yields no 'caption'; use data.condition = 'label'")
        return self.captions(batch["caption"], device)

    def captions(self, captions: list[str], device: torch.device) -> Condition:
        text, mask = self.text_encoder.encode(captions)
        return Condition(text=text.to(device), text_mask=mask.to(device))
