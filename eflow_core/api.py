"""Everything a plugin may use, in one module: `from eflow.api import ...`.

A plugin is a module with `@hookimpl` functions that call `register(name, factory, summary=...,
options=PydanticModel, **capabilities)` (docs/plugins.md). It implements one of eight contracts:

    kind               contract           the factory is called as
    attention          SelfAttention      factory(dim, num_heads, **options)
    objective          Objective          factory(total_steps=..., **options)
    token_drop         TokenDrop          factory(**options)
    sampler            Sampler            factory(**options)
    dataset            Dataset            factory(frames, height, width, seed=..., **options)
    autoencoder        Autoencoder        factory(**options)
    text_encoder       TextEncoder        factory(**options)
    feature_extractor  FeatureExtractor   factory(context=..., **options)

The first four are base classes to subclass (they hold shared machinery). The last four are
Protocols: any object with the required members fits (subclassing is optional); the optional members
each Protocol lists are read when present. `conforms(kind, obj)` checks an object against its kind;
tests run it over every registered plugin.

Below the contracts: the objects plugins receive (conditions, token contexts, step info), the error
types and helpers, and the shared kernels and utilities the built-in plugins use. Built-in plugins
import only this module; a third-party plugin should do the same, so that what it relies on is what
this module promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from eflow.condition import NULL_LABEL, Condition
from eflow.data.clip_dataset import ClipDataset, MediaEntry
from eflow.data.latent_shards import LatentShards
from eflow.data.readers import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from eflow.data.text_cache import CaptionCache
from eflow.data.video_io import write_grid_png, write_mp4
from eflow.distill.capture import AttentionRecorder
from eflow.distill.teacher import Teacher, guided_velocity, load_teacher
from eflow.errors import ConfigError, EflowError
from eflow.eval.classifier import classifier_path, load_classifier, resolve_dataset_options
from eflow.eval.extractor import file_sha256, to_unit_range
from eflow.loss_weight import adaptive_weight, per_sample_mse
from eflow.model import block_sparse, flex
from eflow.model.attention_reference import dense_attention, linear_attention_reference, window_mask
from eflow.model.block_sparse import masked_attention, selection_block_mask, topk_count
from eflow.model.flex import num_blocks, pad_tokens
from eflow.model.mix_ffn import MixFFN
from eflow.model.rope import apply_rope
from eflow.model.self_attention import HeadRows, RMSNorm, SelfAttention
from eflow.model.tokens import TokenContext
from eflow.network import expand_like, solution_map
from eflow.objective import (
    ForwardCost,
    LossOutput,
    Objective,
    StepInfo,
    batch_share,
    rows_in,
    validated_options,
)
from eflow.registry import format_validation_error, get_registry, hookimpl
from eflow.sampler import (
    GridSampler,
    GridStep,
    Sampler,
    ShiftOptions,
    StepCallback,
    guidance_input,
    shift_field,
    takes_callback,
    time_dtype,
)
from eflow.text_encoding import Dtype, LocalTransformerEncoder, require_transformers, words
from eflow.text_file import read_utf8
from eflow.timesteps import (
    intermediate_time,
    l_ratio,
    logit_normal,
    mva_grid,
    rand,
    randn,
    randn_like,
    sample_mva_triplets,
    sample_scm_times,
    sampling_schedule,
    shift_time,
)
from eflow.token_drop import TokenDrop

# ----- the contracts without shared machinery (Protocols) ----------------------------------------


@runtime_checkable
class Dataset(Protocol):
    """A map-style dataset of clips: item i -> dict.

    Required: `__len__`, `__getitem__(i)` -> {"video": [C, T, H, W] float in [0, 1]} or pre-encoded
    {"latents": [c, t, h, w]}, plus "label" (int) for label-conditioned data or "caption" (str) or
    "text"/"text_mask" (embeddings) for text-conditioned data. A dataset without labels registers with
    the capability `labels=False`.
    Optional, read when present: `num_classes` (int), `classes` (names, index = label), `caption(i)`
    (a caption without decoding the clip), `check_run(autoencoder, latent_shape, text_encoder,
    text_dim)` (pre-encoded data refuses a run it does not fit), `image_indices` (items that are
    single images, for data.image_ratio), `take_skips()` (files left out by a scan), `describe()`.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


@runtime_checkable
class Autoencoder(Protocol):
    """Video <-> latents.

    Required: `encode(video [B, C, T, H, W] in [-1, 1]) -> latents [B, c, t, h, w]`, `decode(latents)
    -> video`, `latent_shape((C, T, H, W)) -> (c, t, h, w)`.
    Optional: being an nn.Module (then the runtime moves it to the run's device), `needs_statistics`
    and `fit_statistics(clips) -> options` (statistics fitted on a new run's first clips and recorded
    in its config), `temporal_compression`, `spatial_compression`.
    """

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, int, int, int]: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> token embeddings.

    Required: `dim` (embedding width), `encode(captions: list[str]) -> (text [B, L, dim], mask [B, L]
    bool)`. Optional: being an nn.Module, `max_tokens` or `max_length`, a `cache`.
    """

    dim: int

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """Videos -> features for Frechet distances (FVD).

    Required: `name`, `dim`, `protocol` (JSON-able facts that change the numbers), `content_hash` (of
    the weights), `features(videos [B, T, H, W, 3] uint8) -> [B, dim]`. Optional: `metric_label`.
    """

    name: str
    dim: int
    protocol: dict
    content_hash: str

    def features(self, videos: Tensor) -> Tensor: ...


CONTRACTS: dict[str, type] = {
    "attention": SelfAttention,
    "objective": Objective,
    "token_drop": TokenDrop,
    "sampler": Sampler,
    "dataset": Dataset,
    "autoencoder": Autoencoder,
    "text_encoder": TextEncoder,
    "feature_extractor": FeatureExtractor,
}


def conforms(kind: str, obj: Any) -> bool:
    """Whether `obj` (a built implementation) fulfils the contract of plugin kind `kind`."""
    return isinstance(obj, CONTRACTS[kind])


__all__ = [
    "CONTRACTS",
    "IMAGE_SUFFIXES",
    "NULL_LABEL",
    "VIDEO_SUFFIXES",
    "AttentionRecorder",
    "Autoencoder",
    "CaptionCache",
    "ClipDataset",
    "Condition",
    "ConfigError",
    "Dataset",
    "Dtype",
    "EflowError",
    "FeatureExtractor",
    "ForwardCost",
    "GridSampler",
    "GridStep",
    "HeadRows",
    "LatentShards",
    "LocalTransformerEncoder",
    "LossOutput",
    "MediaEntry",
    "MixFFN",
    "Objective",
    "RMSNorm",
    "Sampler",
    "SelfAttention",
    "ShiftOptions",
    "StepCallback",
    "StepInfo",
    "Teacher",
    "TextEncoder",
    "TokenContext",
    "TokenDrop",
    "adaptive_weight",
    "apply_rope",
    "batch_share",
    "block_sparse",
    "classifier_path",
    "conforms",
    "dense_attention",
    "expand_like",
    "file_sha256",
    "flex",
    "format_validation_error",
    "get_registry",
    "guidance_input",
    "guided_velocity",
    "hookimpl",
    "intermediate_time",
    "l_ratio",
    "linear_attention_reference",
    "load_classifier",
    "load_teacher",
    "logit_normal",
    "masked_attention",
    "mva_grid",
    "num_blocks",
    "pad_tokens",
    "per_sample_mse",
    "rand",
    "randn",
    "randn_like",
    "read_utf8",
    "require_transformers",
    "resolve_dataset_options",
    "rows_in",
    "sample_mva_triplets",
    "sample_scm_times",
    "sampling_schedule",
    "selection_block_mask",
    "shift_field",
    "shift_time",
    "solution_map",
    "takes_callback",
    "time_dtype",
    "to_unit_range",
    "topk_count",
    "validated_options",
    "window_mask",
    "words",
    "write_grid_png",
    "write_mp4",
]
