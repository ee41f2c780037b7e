"""The conditioning signal: class labels or text tokens, with a null condition for guidance."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

NULL_LABEL = -1  # the label id of the unconditional (null) class


@dataclass
class Condition:
    """labels [B] long (NULL_LABEL = null) or text [B, L, Dt] float with text_mask [B, L] bool."""

    labels: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels is None and self.text is None:
            raise ValueError("a Condition needs labels or text")
        if self.text is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.text)

    @property
    def device(self) -> torch.device:
        return (self.labels if self.labels is not None else self.text).device

    def to(self, device) -> Condition:
        return Condition(
            *(None if v is None else v.to(device) for v in (self.labels, self.text, self.text_mask))
        )

    def null(self) -> Condition:
        """The null condition for every sample."""
        return self.drop(torch.ones(len(self), dtype=torch.bool, device=self.device))

    def drop(self, mask: Tensor) -> Condition:
        """Replace the condition of samples where mask [B] is True by the null condition."""
        labels = text_mask = None
        if self.labels is not None:
            labels = torch.where(mask, torch.full_like(self.labels, NULL_LABEL), self.labels)
        if self.text is not None:
            text_mask = self.text_mask & ~mask[:, None]
        return replace(self, labels=labels, text_mask=text_mask if text_mask is not None else self.text_mask)

    def is_null(self) -> Tensor:
        """[B] bool: which samples carry the null condition."""
        if self.labels is not None:
            return self.labels == NULL_LABEL
        return ~self.text_mask.any(dim=1)

    def __getitem__(self, idx) -> Condition:
        """Select samples (a slice, an index tensor or a bool mask)."""
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        return Condition(pick(self.labels), pick(self.text), pick(self.text_mask))

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Concatenate conditions along the batch."""

        def cat(field):
            vals = [getattr(c, field) for c in conds]
            return None if vals[0] is None else torch.cat(vals)

        return Condition(cat("labels"), cat("text"), cat("text_mask"))
