"""Per-caption embedding cache: each distinct caption goes through the text encoder once.

A text encoder's raw call maps a list of captions to (embeddings [N, L, dim], mask [N, L]) with the
real tokens first (right padding). The cache keeps, per caption, only the rows up to its last real
token, emb [n, dim] and mask [n], on the CPU in the dtype the encoder produced, in least-recently-used
order under a byte budget. A batch is then assembled from the cache: rows padded with zeros (mask
False) to L = the longest caption of the batch (at least 1), returned as float32.

Misses of one call are computed together, in their order of first appearance, so a batch with k new
captions costs one encoder call of k captions; repeats within the batch are computed once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RawEncode = Callable[[list[str]], tuple[Tensor, Tensor]]


class CaptionCache:
    """LRU of caption -> (emb [n, dim], mask [n]) under `max_bytes` (0 keeps nothing)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.misses = 0  # captions computed by the encoder so far
        self._rows: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, caption: object) -> bool:
        return caption in self._rows

    def clear(self) -> None:
        self._rows.clear()
        self.bytes = 0

    def _put(self, caption: str, emb: Tensor, mask: Tensor) -> None:
        size = emb.numel() * emb.element_size() + mask.numel()
        if size > self.max_bytes:
            return
        self._rows[caption] = (emb, mask)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old_emb, old_mask) = self._rows.popitem(last=False)
            self.bytes -= old_emb.numel() * old_emb.element_size() + old_mask.numel()

    def encode(self, captions: Sequence[str], raw_encode: RawEncode) -> tuple[Tensor, Tensor]:
        """captions (B) -> (float32 [B, L, dim], bool [B, L]) on the CPU; raw_encode runs on misses only."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, got a single string")
        if not captions:
            raise ValueError("encode needs at least one caption")
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        missing = list(dict.fromkeys(c for c in captions if c not in self._rows))
        if missing:
            emb, mask = raw_encode(missing)
            if emb.ndim != 3 or mask.shape != emb.shape[:2] or emb.shape[0] != len(missing):
                raise ValueError(
                    f"text encoder returned emb {tuple(emb.shape)} and mask {tuple(mask.shape)} "
                    f"for {len(missing)} captions; expected [N, L, dim] and [N, L]"
                )
            emb, mask = emb.detach().cpu(), mask.detach().cpu().bool()
            self.misses += len(missing)
            for i, caption in enumerate(missing):
                real = mask[i].nonzero()
                n = int(real[-1]) + 1 if len(real) else 0
                row = (emb[i, :n].clone(), mask[i, :n].clone())
                fresh[caption] = row
                self._put(caption, *row)
        rows = []
        for caption in captions:
            if caption in fresh:
                rows.append(fresh[caption])
            else:
                self._rows.move_to_end(caption)
                rows.append(self._rows[caption])
        return pad_rows(rows)


def pad_rows(rows: Sequence[tuple[Tensor, Tensor]], length: int | None = None) -> tuple[Tensor, Tensor]:
    """[(emb [n_i, dim], mask [n_i])] -> (float32 [B, L, dim], bool [B, L]), L = length or max(n_i, 1)."""
    dim = rows[0][0].shape[-1]
    longest = max(1, *(len(m) for _, m in rows))
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"cannot pad {longest} tokens to length {length}")
    emb = torch.zeros(len(rows), length, dim)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (e, m) in enumerate(rows):
        emb[b, : len(m)] = e.float()
        mask[b, : len(m)] = m
    return emb, mask
