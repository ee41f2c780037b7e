"""Text encoder `hashed-words`: a bag of fixed pseudo-random word vectors (offline, deterministic, no weights).

Not a language model: captions are lower-cased and split into words; each word maps to a fixed
N(0, 1) vector of size `dim` drawn from a generator seeded by zlib.crc32(word) (stable across
processes and machines, unlike Python's hash()). Word order is not encoded. Good enough to try text
conditioning on the `shapes` captions ("a red square moving left") with no external model.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.api import hookimpl, words


class HashedWordsOptions(BaseModel):
    """Options of the `hashed-words` text encoder."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=1, le=8192, description="size of each word vector")
    max_tokens: int = Field(16, ge=1, le=1024, description="captions are padded/truncated to this many words")


def word_vector(word: str, dim: int) -> np.ndarray:
    """The fixed float32 [dim] vector of a word, seeded by zlib.crc32 of its UTF-8 bytes."""
    return np.random.default_rng(zlib.crc32(word.encode("utf-8"))).standard_normal(dim).astype(np.float32)


class HashedWordsEncoder(nn.Module):
    """captions list[str] -> (embeddings float32 [B, max_tokens, dim], mask bool [B, max_tokens])."""

    def __init__(self, dim: int = 64, max_tokens: int = 16):
        super().__init__()
        self.dim, self.max_tokens = dim, max_tokens
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self._cache: dict[str, Tensor] = {}

    def _vector(self, word: str) -> Tensor:
        if word not in self._cache:
            self._cache[word] = torch.from_numpy(word_vector(word, self.dim))
        return self._cache[word]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """list of B captions -> embeddings [B, L, dim] (zeros where padded), mask [B, L] (True = a word)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, got a single string")
        emb = torch.zeros(len(captions), self.max_tokens, self.dim)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for b, caption in enumerate(captions):
            for i, word in enumerate(words(caption)[: self.max_tokens]):
                emb[b, i] = self._vector(word)
                mask[b, i] = True
        return emb.to(self._anchor.device), mask.to(self._anchor.device)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_tokens={self.max_tokens}"


@hookimpl
def register_text_encoders(register):
    register(
        "hashed-words",
        HashedWordsEncoder,
        summary="a bag of fixed pseudo-random word vectors (crc32-seeded), offline; not a language model",
        options=HashedWordsOptions,
    )
