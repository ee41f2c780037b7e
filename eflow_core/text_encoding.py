"""What the text encoder plugins share: caption words, and the base of transformers-based encoders.

`words` splits a caption the way the hashed encoders (`hashed`, `hashed-words`) read it.
`LocalTransformerEncoder` holds what every transformers encoder read from a local folder shares
(`t5`, `minilm`): loading on first use, straight onto the encoder's device, in the chosen dtype;
token states [B, L, dim] zeroed where padded; the per-caption cache (eflow.data.text_cache); frozen.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from eflow.data.text_cache import CaptionCache
from eflow.errors import EflowError

WORD = re.compile(r"\w+")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def words(caption: str) -> list[str]:
    """Lower-cased words of a caption (punctuation dropped)."""
    return WORD.findall(caption.lower())


def require_transformers(name: str, extra: str) -> None:
    """Fail with the extra to install when transformers is missing."""
    if importlib.util.find_spec("transformers") is None:
        raise EflowError(
            f"text encoder '{name}' needs the transformers package: pip install 'eflow[{extra}]'"
        )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class LocalTransformerEncoder(nn.Module, ABC):
    """Token states of a transformers encoder read from a local folder; loads on first encode.

    Subclasses set `name`, `extra` and implement `load_model(folder, dtype)`.
    """

    name = "transformer"
    extra = "t5"

    def __init__(
        self,
        model_dir: Path,
        tokenizer_dir: Path,
        *,
        max_length: int,
        dtype: str = "auto",
        cache_mb: float = 1024.0,
    ):
        super().__init__()
        require_transformers(self.name, self.extra)
        self.model_dir, self.tokenizer_dir = Path(model_dir), Path(tokenizer_dir)
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.dim = int(self.hidden_size(self.config))
        self.max_length, self.dtype_name = max_length, dtype
        self.cache = CaptionCache(int(cache_mb * 2**20))
        self.encoder: nn.Module | None = None  # loaded on first use
        self.tokenizer = None
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    @staticmethod
    def hidden_size(config: dict) -> int:
        return config.get("d_model") or config["hidden_size"]

    @abstractmethod
    def load_model(self, folder: Path, dtype: torch.dtype) -> nn.Module:
        """The transformers encoder in `folder`, its weights in `dtype` (on the CPU)."""

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        device = self._anchor.device
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # eflow draws its own progress
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
            model = self.load_model(self.model_dir, resolve_dtype(self.dtype_name, device))
        except (OSError, ValueError) as err:
            raise EflowError(f"text encoder '{self.name}' cannot load {self.model_dir}: {err}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.encoder = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def raw_encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Uncached: N captions -> (float32 [N, L, dim] zero where padded, bool [N, L]) on the CPU."""
        if self.encoder is None:
            self._load()
        device = self._anchor.device
        batch = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [N, L, dim]
        states = states.float().masked_fill(~mask.bool()[..., None], 0.0)
        return states.cpu(), mask.bool().cpu()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """list of B captions -> (float32 [B, L, dim], bool [B, L]) on the encoder's device."""
        emb, mask = self.cache.encode(captions, self.raw_encode)
        return emb.to(self._anchor.device), mask.to(self._anchor.device)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)

    def train(self, mode: bool = True) -> LocalTransformerEncoder:
        """The encoder is frozen: it stays in eval mode (no dropout) whatever the caller asks."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def extra_repr(self) -> str:
        loaded = "loaded" if self.encoder is not None else "not loaded yet"
        return f"{self.model_dir}, dim={self.dim}, max_length={self.max_length}, dtype={self.dtype_name}, {loaded}"
