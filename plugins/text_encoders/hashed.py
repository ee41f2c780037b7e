"""Text encoder `hashed`: hashed token embedding with word positions (offline, no dependencies, no weights).

A caption is lower-cased and split into words w_1..w_n (n <= max_tokens). Token i is

    e_i = E[crc32(w_i) mod buckets] + P[i]

E: a fixed [buckets, dim] table of N(0, 1) entries drawn from numpy's Generator seeded with `seed`;
P[i]: the sinusoidal position code P[i, 2k] = sin(i / 10000^(2k/dim)), P[i, 2k+1] = cos(...), so
word order is encoded ("a square left of a circle" differs from "a circle left of a square").
crc32 is stable across processes and machines, unlike Python's hash(); two words share a row with
probability about 1/buckets.

Where the learning happens: E is fixed so that embeddings can be cached per caption and written
once by `eflow data encode`; the DiT's text projection (a learned Linear(dim, D)) and its
cross-attention keys and values are trained. While the words in use are fewer than `dim` (the
`shapes` captions use about 30), their rows of E are linearly independent, so the learned projection
can place every word anywhere: the pair is then a learned token embedding.

Differs from `hashed-words` (one fixed vector per word, no positions, unbounded table) by the
position code and the bounded table. Encodings go through the per-caption cache
(eflow.data.text_cache): each distinct caption is computed once.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.api import CaptionCache, hookimpl, words


class HashedOptions(BaseModel):
    """Options of the `hashed` text encoder."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=2, le=8192, description="size of each token embedding")
    max_tokens: int = Field(32, ge=1, le=1024, description="words kept per caption (the rest are cut)")
    buckets: int = Field(4096, ge=1, le=1 << 20, description="rows of the hashed embedding table")
    seed: int = Field(0, ge=0, description="seed of the embedding table")
    cache_mb: float = Field(64.0, ge=0, description="size of the per-caption cache in MiB (0 = no cache)")


def position_code(length: int, dim: int) -> Tensor:
    """Sinusoidal position code float32 [length, dim]."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [ceil(dim / 2)]
    code = torch.zeros(length, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return code.float()


def bucket(word: str, buckets: int) -> int:
    """Row of the embedding table for a word: crc32 of its UTF-8 bytes mod buckets."""
    return zlib.crc32(word.encode("utf-8")) % buckets


class HashedEncoder(nn.Module):
    """captions list[str] -> (float32 [B, L, dim], bool [B, L]), L = the longest caption's words (>= 1)."""

    def __init__(
        self, dim: int = 64, max_tokens: int = 32, buckets: int = 4096, seed: int = 0, cache_mb: float = 64.0
    ):
        super().__init__()
        HashedOptions(dim=dim, max_tokens=max_tokens, buckets=buckets, seed=seed, cache_mb=cache_mb)
        self.dim, self.max_tokens, self.buckets, self.seed = dim, max_tokens, buckets, seed
        table = np.random.default_rng(seed).standard_normal((buckets, dim)).astype(np.float32)
        self.table = torch.from_numpy(table)  # fixed, CPU: rows are gathered before moving to the device
        self.positions = position_code(max_tokens, dim)
        self.cache = CaptionCache(int(cache_mb * 2**20))
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    def raw_encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Uncached: list of N captions -> (float32 [N, max_tokens, dim], bool [N, max_tokens])."""
        emb = torch.zeros(len(captions), self.max_tokens, self.dim)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for b, caption in enumerate(captions):
            ids = [bucket(w, self.buckets) for w in words(caption)[: self.max_tokens]]
            emb[b, : len(ids)] = self.table[ids] + self.positions[: len(ids)]
            mask[b, : len(ids)] = True
        return emb, mask

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """list of B captions -> embeddings [B, L, dim] (zeros where padded), mask [B, L] (True = a word)."""
        emb, mask = self.cache.encode(captions, self.raw_encode)
        return emb.to(self._anchor.device), mask.to(self._anchor.device)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_tokens={self.max_tokens}, buckets={self.buckets}, seed={self.seed}"


@hookimpl
def register_text_encoders(register):
    register(
        "hashed",
        HashedEncoder,
        summary="hashed token embedding + word positions (offline, no weights); the DiT learns on top",
        options=HashedOptions,
    )
