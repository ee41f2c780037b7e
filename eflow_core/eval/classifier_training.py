"""Training the in-domain classifier on a labelled dataset, with a deterministic held-out split.

From one permutation of the dataset seeded by `seed`, the first `heldout_clips` indices are held
out and the next `train_clips` are trained on (disjoint). Clips are rendered once, quantized to
uint8 exactly as at evaluation time (`to_uint8`), and kept in memory (N x 3 x T x H x W bytes).
AdamW (weight decay 1e-4) with a one-cycle learning-rate schedule peaking at `lr`, cross-entropy,
`epochs` passes over the training clips in a seeded order. The held-out accuracy (overall and per
class) is measured at the end and stored in the checkpoint's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress

from eflow.errors import EflowError
from eflow.eval.accuracy import ClassTally
from eflow.eval.classifier import (
    VideoClassifier,
    classifier_path,
    read_classifier_meta,
    resolve_dataset_options,
    save_classifier,
)
from eflow.eval.clips import load_clips, split_indices
from eflow.eval.extractor import to_unit_range

# below this held-out accuracy an in-domain classifier tells classes apart too poorly for its class
# accuracy (and its features' FVD) to mean much; eflow eval says so
WEAK_CLASSIFIER = 0.9


@dataclass
class ClassifierTraining:
    """How the in-domain classifier is trained (recorded in its checkpoint)."""

    train_clips: int = 4000  # clips trained on
    heldout_clips: int = 1000  # clips held out for the accuracy
    epochs: int = 4  # passes over the training clips
    batch_size: int = 32  # clips per optimizer step
    lr: float = 3e-3  # peak of the one-cycle schedule
    net_width: int = 32  # w: channels of the first stage (features are 4w wide)
    seed: int = 0  # dataset seed, split and initialization

    def check(self) -> None:
        for name in ("train_clips", "heldout_clips", "epochs", "batch_size", "net_width"):
            if getattr(self, name) < 1:
                raise EflowError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EflowError(f"--lr must be positive, got {self.lr}")


def class_names(dataset, num_classes: int) -> list[str]:
    """The dataset's class names if it has them (`classes`), else "0", "1", ..."""
    names = getattr(dataset, "classes", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def train_classifier(
    dataset,
    settings: ClassifierTraining,
    device: torch.device,
    progress: Progress | None = None,
) -> tuple[VideoClassifier, dict[str, Any]]:
    """Train on `dataset`'s labels; returns the model (eval mode, CPU) and its metadata."""
    settings.check()
    num_classes = getattr(dataset, "num_classes", None)
    if not num_classes:
        raise EflowError("the in-domain classifier needs a labelled dataset (one with num_classes)")
    heldout_idx, train_idx = split_indices(
        len(dataset), [settings.heldout_clips, settings.train_clips], settings.seed
    )
    x_train, y_train = load_clips(dataset, train_idx)
    x_held, y_held = load_clips(dataset, heldout_idx)
    if y_train is None:
        raise EflowError("the dataset's items have no 'label'; the in-domain classifier needs labels")

    torch.manual_seed(settings.seed)
    model = VideoClassifier(num_classes, settings.net_width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(train_idx) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total)
    order = torch.Generator().manual_seed(settings.seed + 1)
    task = progress.add_task("train classifier", total=total, info="") if progress is not None else None
    model.train()
    for _epoch in range(settings.epochs):
        perm = torch.randperm(len(train_idx), generator=order)
        for b in range(steps_per_epoch):
            pick = perm[b * settings.batch_size : (b + 1) * settings.batch_size]
            x = to_unit_range(x_train[pick].to(device))
            loss = F.cross_entropy(model(x), y_train[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if task is not None:
                progress.update(task, advance=1, info=f"loss {loss.item():.3f}")
    model.eval()
    tally = ClassTally(num_classes, class_names(dataset, num_classes))
    with torch.no_grad():
        for start in range(0, len(x_held), 256):
            logits = model(to_unit_range(x_held[start : start + 256].to(device)))
            tally.update(y_held[start : start + 256], logits)
    meta = {
        "classes": tally.class_names,
        "heldout": tally.summary(),
        "training": asdict(settings),
        "final_loss": float(loss.item()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return model.cpu().requires_grad_(False), meta


def train_and_cache(
    dataset: str,
    dataset_options: dict[str, Any] | None,
    frames: int,
    height: int,
    width: int,
    settings: ClassifierTraining,
    device: torch.device,
    cache_dir: str | None = None,
    progress: Progress | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build the dataset, train the classifier and write it to the cache (replacing an older one);
    returns the checkpoint path and its metadata."""
    from eflow.registry import get_registry

    options = resolve_dataset_options(dataset, dataset_options)
    data = get_registry("dataset").create(dataset, frames, height, width, seed=settings.seed, options=options)
    model, meta = train_classifier(data, settings, device, progress)
    meta.update(dataset=dataset, dataset_options=options, clip=[frames, height, width])
    path = classifier_path(dataset, options, frames, height, width, cache_dir)
    try:
        save_classifier(path, model, meta)
    except OSError as err:
        raise EflowError(f"cannot write the classifier to {path}: {err.strerror or err}") from None
    return path, read_classifier_meta(path)
