"""Deterministic batches: the clips of step k on rank r depend only on (seed, k, r), so resume is exact.

Step k draws from the dataset of its stage's clip size (curriculum.py) and is a video step or an image
step (image_mixing.py). Each dataset's items are split into two pools, videos and images (the indices
in its optional `image_indices`). A pool is walked in a fresh seeded permutation per epoch; a step of
a kind takes the next global_batch positions of that kind's pool, where "next" counts only the earlier
steps of the same kind, and rank r takes its slice of them. Position p of a pool of n items is item
perm_e[p mod n] at epoch e = p div n, fetched as dataset.item(index, e) when the dataset has that method
(its random window then depends on (seed, e, index)), else dataset[index].

An item is {"video": float [C, T, H, W] in [-1, 1] (or uint8 pixels, which the trainer maps to [-1, 1]
as x / 127.5 - 1)} or {"latents": float [c, t, h, w]} (pre-encoded and
normalized; the trainer skips the autoencoder), plus optionally "label": int, "caption": str, or
"text": float [L, Dt] with "text_mask": bool [L] (pre-computed embeddings; the Conditioner skips the
text encoder). Collation stacks them, pads text to the longest L (mask False), and attaches the skip
events the dataset recorded while loading ("skipped", see skips.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from eflow.condition import Condition
from eflow.data.image_mixing import StepKinds
from eflow.data.skips import take_skips
from eflow.errors import EflowError

IMAGE_PERM_SALT = 500_009  # keeps the image pool's permutations apart from the video pool's


class StepBatches:
    """This rank's share of every optimizer step, drawn from the curriculum's datasets as the module says."""

    def __init__(
        self,
        datasets: Dataset | Sequence[Dataset],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        *,
        dataset_of: Callable[[int], int] | None = None,
        image_ratio: float = 0.0,
    ):
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the number of processes ({world})"
            )
        self.datasets = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
        self.global_batch = batch_size
        self.local_batch = batch_size // world
        self.seed = seed
        self.rank = rank
        self.dataset_of = dataset_of or (lambda step: 0)  # step -> index into datasets
        self.pools = [_pools(ds) for ds in self.datasets]  # per dataset: (videos, images)
        if image_ratio > 0:
            for ds, (_, images) in zip(self.datasets, self.pools, strict=True):
                if not images:
                    raise EflowError(
                        f"data.image_ratio = {image_ratio} but the dataset {_describe(ds)} holds no images"
                    )
        all_images = all(not videos for videos, _ in self.pools)
        if not all_images and any(not videos for videos, _ in self.pools):
            raise EflowError("some stages' datasets hold videos and others only images; use one kind")
        self.kinds = StepKinds(1.0 if all_images else image_ratio, seed)
        self._perms: dict[tuple[int, bool], tuple[int, torch.Tensor]] = {}

    def _permutation(self, dataset: int, image: bool, epoch: int) -> torch.Tensor:
        key = (dataset, image)
        cached = self._perms.get(key)
        if cached is None or cached[0] != epoch:
            seed = self.seed * 1_000_003 + epoch + (IMAGE_PERM_SALT if image else 0)
            pool = self.pools[dataset][1 if image else 0]
            cached = (epoch, torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)))
            self._perms[key] = cached
        return cached[1]

    def keys(self, step: int) -> tuple[int, bool, list[tuple[int, int]]]:
        """(dataset index, image step?, [(item index, epoch)] of this rank's share of step `step`)."""
        dataset = self.dataset_of(step)
        image = self.kinds.is_image(step)
        pool = self.pools[dataset][1 if image else 0]
        n = len(pool)
        start = self.kinds.count_before(step, image) * self.global_batch + self.rank * self.local_batch
        out = []
        for pos in range(start, start + self.local_batch):
            epoch = pos // n
            out.append((pool[int(self._permutation(dataset, image, epoch)[pos % n])], epoch))
        return dataset, image, out

    def indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's share of optimizer step `step`."""
        return [index for index, _ in self.keys(step)[2]]

    def get(self, step: int) -> dict:
        """This rank's collated batch of step `step` (see collate), with "step", the items' "index" and
        "epoch", and "skipped" (the dataset's new skip events)."""
        d, _, keys = self.keys(step)
        ds = self.datasets[d]
        fetch = getattr(ds, "item", None)
        items = [fetch(i, e) if callable(fetch) else ds[i] for i, e in keys]
        batch = collate(items, step)
        batch["step"] = step
        batch["index"] = torch.tensor([i for i, _ in keys], dtype=torch.long)  # [B] which items ...
        batch["epoch"] = torch.tensor([e for _, e in keys], dtype=torch.long)  # [B] ... at which epoch
        batch["skipped"] = take_skips(ds)
        return batch


def _pools(dataset) -> tuple[list[int], list[int]]:
    images = sorted(int(i) for i in getattr(dataset, "image_indices", ()) or ())
    image_set = set(images)
    videos = (
        [i for i in range(len(dataset)) if i not in image_set] if image_set else list(range(len(dataset)))
    )
    return videos, images


def _describe(dataset) -> str:
    source = getattr(dataset, "source", None)
    return f"from {source}" if source else type(dataset).__name__


def collate(items: list[dict], step: int | None = None) -> dict:
    """Items -> {"video" | "latents": [B, ...], "label": [B] long, "caption": list[str],
    "text": [B, L, Dt] float, "text_mask": [B, L] bool}."""
    where = f" of step {step}" if step is not None else ""
    keys = set(items[0])
    if any(set(it) != keys for it in items):
        raise EflowError(f"the items{where} do not all have the same fields: {[sorted(it) for it in items]}")
    batch: dict = {}
    for key in ("video", "latents"):
        if key in keys:
            shapes = {tuple(it[key].shape) for it in items}
            if len(shapes) > 1:
                raise EflowError(f"the {key} items{where} differ in shape: {sorted(shapes)}")
            dtypes = {it[key].dtype for it in items}
            if len(dtypes) > 1:
                raise EflowError(f"the {key} items{where} differ in dtype: {sorted(map(str, dtypes))}")
            batch[key] = torch.stack([it[key] for it in items])
    if "video" not in batch and "latents" not in batch:
        raise EflowError(f"the items{where} carry neither 'video' nor 'latents' (fields: {sorted(keys)})")
    if "label" in keys:
        batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    if "caption" in keys:
        batch["caption"] = [it["caption"] for it in items]
    if "text" in keys:
        batch["text"], batch["text_mask"] = _pad_text(items)
    return batch


def _pad_text(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings [L_i, Dt] (+ masks [L_i]) -> [B, max L, Dt] and [B, max L] (padding masked out)."""
    length = max(it["text"].shape[0] for it in items)
    dim = items[0]["text"].shape[-1]
    text = torch.zeros(len(items), length, dim, dtype=torch.float32)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, it in enumerate(items):
        emb = torch.as_tensor(it["text"])
        n = emb.shape[0]
        text[b, :n] = emb.float()
        mask[b, :n] = torch.as_tensor(it["text_mask"]).bool() if "text_mask" in it else True
    return text, mask


class Conditioner:
    """Turns a batch's labels, captions or pre-computed text embeddings into a Condition."""

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
        if "text" in batch:
            return self.embeddings(batch["text"], batch.get("text_mask"), device)
        if "caption" not in batch:
            raise ValueError("the dataset yields no 'caption' or 'text'; use data.condition = 'label'")
        return self.captions(batch["caption"], device)

    def captions(self, captions: list[str], device: torch.device) -> Condition:
        text, mask = self.text_encoder.encode(captions)
        return Condition(text=text.to(device), text_mask=mask.to(device))

    def embeddings(self, text: torch.Tensor, mask: torch.Tensor | None, device: torch.device) -> Condition:
        """Pre-computed text [B, L, Dt] (+ mask [B, L]); Dt must be the text encoder's width."""
        dim = getattr(self.text_encoder, "dim", None)
        if dim is not None and text.shape[-1] != dim:
            raise EflowError(
                f"the dataset's text embeddings are {text.shape[-1]}-d but the text encoder gives {dim}-d; "
                "set data.text_encoder to the encoder the embeddings were made with"
            )
        mask = None if mask is None else mask.to(device)
        return Condition(text=text.to(device).float(), text_mask=mask)
