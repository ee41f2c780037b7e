"""Class accuracy: how often a classifier recovers the intended label, overall and per class.

Used twice: for the in-domain classifier on held-out real clips, and for sample class accuracy,
where clips are generated for each label in turn (balanced over the classes) and the in-domain
classifier's argmax is compared with the label they were generated for.

    accuracy = correct / N,  accuracy_c = correct_c / N_c  (N_c clips of intended class c)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class ClassTally:
    """Counts of (intended label, predicted label) pairs: a K x K confusion matrix."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, labels: Tensor, logits: Tensor) -> None:
        """Add intended labels [B] and the classifier's logits [B, K]."""
        predicted = logits.argmax(dim=1).cpu()
        pairs = labels.cpu().long() * self.num_classes + predicted
        self.confusion += torch.bincount(pairs, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    def overall(self) -> float:
        """Fraction of clips whose predicted label is the intended one."""
        return float(self.confusion.diag().sum()) / max(self.total, 1)

    def per_class(self) -> dict[str, dict[str, Any]]:
        """{class name: {"accuracy", "n"}} for every class with at least one clip."""
        out = {}
        for c, name in enumerate(self.class_names):
            n = int(self.confusion[c].sum())
            if n:
                out[name] = {"accuracy": float(self.confusion[c, c]) / n, "n": n}
        return out

    def summary(self) -> dict[str, Any]:
        """{"accuracy", "n", "per_class"} for reports."""
        return {"accuracy": self.overall(), "n": self.total, "per_class": self.per_class()}
