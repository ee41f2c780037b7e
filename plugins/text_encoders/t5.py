"""Text encoder `t5`: a T5 / UMT5 / mT5 encoder and its tokenizer from a local directory (transformers).

    tokens, mask = tokenizer(captions, padding="longest", truncation=max_length)
    text = encoder(tokens, mask).last_hidden_state * mask     # [B, L, d_model], zeros where padded

The token-level states feed the DiT's cross-attention (EFlow conditions on T5; Wan 2.1 uses UMT5-XXL,
d_model 4096, captions cut at 512 tokens). Padding is to the longest caption of a batch rather than
to max_length: under a key mask the result is the same, and short captions cost less.

Nothing is downloaded: files are read with local_files_only=True and HF_HUB_OFFLINE=1. `path` is
either the encoder's own folder (config.json, weights, tokenizer files) or a diffusers-style
repository with text_encoder/ and tokenizer/ subfolders (the Wan 2.1 layout); `subfolder` and
`tokenizer_subfolder` override the detection. The weights load on first use, straight onto the device
the encoder was moved to, in `dtype` (auto: bfloat16 on CUDA, float32 on CPU); outputs are float32.
Each distinct caption is encoded once (eflow.data.text_cache).

LocalTransformerEncoder holds what every transformers-based encoder shares; `minilm` builds on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from eflow.data.text_cache import CaptionCache
from eflow.errors import ConfigError, EflowError
from eflow.registry import hookimpl

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
ENCODER_CLASSES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"}


class T5Options(BaseModel):
    """Options of the `t5` text encoder."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="local folder of the encoder, or of a repository with text_encoder/ and tokenizer/"
    )
    subfolder: str | None = Field(
        None,
        description="folder of config.json and the weights inside path ('' = path itself; auto if unset)",
    )
    tokenizer_subfolder: str | None = Field(
        None, description="folder of the tokenizer inside path ('' = path itself; auto if unset)"
    )
    max_length: int = Field(512, ge=1, le=8192, description="tokens kept per caption (Wan 2.1: 512)")
    dtype: Dtype = Field("auto", description="weights dtype: auto = bfloat16 on CUDA, float32 on CPU")
    cache_mb: float = Field(1024.0, ge=0, description="size of the per-caption cache in MiB (0 = no cache)")


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


def has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / n).is_file() for n in names)


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


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


def locate(path: Path, subfolder: str | None, default: str, want, what: str) -> Path:
    """The folder holding `what`: path/subfolder when given, else path itself or path/default."""
    if subfolder is not None:
        folder = path / subfolder
        if not (folder.is_dir() and want(folder)):
            raise ConfigError(f"t5: no {what} in {folder}")
        return folder
    for folder in (path, path / default):
        if folder.is_dir() and want(folder):
            return folder
    raise ConfigError(f"t5: no {what} in {path} or {path / default}")


class T5TextEncoder(LocalTransformerEncoder):
    """T5 / UMT5 / mT5 encoder token states from a local folder (see the module docstring)."""

    name = "t5"
    extra = "t5"

    def __init__(
        self,
        path: str | None = None,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        max_length: int = 512,
        dtype: str = "auto",
        cache_mb: float = 1024.0,
    ):
        require_transformers(self.name, self.extra)
        if not path:
            raise ConfigError(
                "text encoder 't5' needs the folder of its weights: "
                "--set data.text_encoder_options.path=DIR (nothing is downloaded)"
            )
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"t5: path {root} is not a folder")
        model_dir = locate(
            root,
            subfolder,
            "text_encoder",
            lambda f: (f / "config.json").is_file() and has_weights(f),
            "config.json with weights",
        )
        tokenizer_dir = locate(
            root, tokenizer_subfolder, "tokenizer", lambda f: has_any(f, TOKENIZER_FILES), "tokenizer files"
        )
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        if model_type not in ENCODER_CLASSES:
            raise ConfigError(
                f"t5: {model_dir / 'config.json'} has model_type {model_type!r}; "
                f"expected one of {', '.join(ENCODER_CLASSES)}"
            )
        super().__init__(model_dir, tokenizer_dir, max_length=max_length, dtype=dtype, cache_mb=cache_mb)
        self.model_type = model_type

    def load_model(self, folder: Path, dtype: torch.dtype) -> nn.Module:
        import transformers

        cls = getattr(transformers, ENCODER_CLASSES[self.model_type])
        return cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype)


@hookimpl
def register_text_encoders(register):
    register(
        "t5",
        T5TextEncoder,
        summary="T5 / UMT5 encoder token states from a local folder (option path; pip install 'eflow[t5]')",
        options=T5Options,
    )
