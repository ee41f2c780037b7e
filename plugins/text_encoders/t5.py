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

What every transformers-based encoder shares (loading, encoding, caching, freezing) is
eflow.text_encoding.LocalTransformerEncoder, which `minilm` builds on too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from eflow.api import ConfigError, Dtype, LocalTransformerEncoder, hookimpl, require_transformers

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


def has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / n).is_file() for n in names)


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


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
