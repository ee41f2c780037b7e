"""Encode a run's dataset once into latent shards (what `eflow data encode` does), as functions.

    cfg = encode_config("run.toml", {"frames": 8, "size": "32"}, ["data.autoencoder=wan"])
    job = prepare_encode(cfg, "latents/shapes", with_text=True)
    index = job.encoder.run()          # resumable: a rerun with the same recipe continues
    print(job.train_command())         # the `eflow train` line that trains on the shards
    job.close()                        # leaves the process group, under torchrun

Under torchrun (WORLD_SIZE > 1) every rank runs the same lines: prepare_encode joins the process group
(eflow.train.distributed) and puts each rank on its own GPU (cuda:LOCAL_RANK), and run() encodes the
rank's share of the shards, which rank 0 merges into the one index.json (eflow.data.latent_shards).

The run's data section (and train.seed) says what is encoded, with which autoencoder and (for captions)
text encoder; the recipe written to index.json records it with every plugin option filled in, so a
rerun with other settings is refused instead of mixing latents (eflow.data.latent_shards).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eflow.assembly import build_dataset, resolve_device
from eflow.config import RunConfig, build_config, load_toml, parse_assignments
from eflow.data.latent_shards import ShardEncoder, storage_dtype_name
from eflow.registry import get_registry
from eflow.run_config import config_layer
from eflow.train.distributed import World, init_world, shutdown

# `eflow data encode` flag -> the RunConfig field it sets (besides `size`, "N" or "HxW").
ENCODE_FLAGS = {
    "data": "data.name",
    "data_root": "data.options.root",
    "frames": "data.frames",
    "autoencoder": "data.autoencoder",
    "vae_path": "data.autoencoder_options.path",
    "text_encoder": "data.text_encoder",
    "seed": "train.seed",
}


def encode_config(
    config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] | None = None,
) -> RunConfig:
    """defaults -> run.toml -> flags (ENCODE_FLAGS names, and size) -> --set pairs, validated."""
    tree = parse_assignments(sets)
    layers = [load_toml(config)] if config is not None else []
    return build_config(*layers, config_layer(flags or {}, ENCODE_FLAGS), tree)


def resolved_options(kind: str, name: str, options: dict) -> dict:
    """A plugin's options with every default filled in, as JSON (recorded in index.json)."""
    parsed = get_registry(kind).get(name).parse_options(options)
    return parsed.model_dump(mode="json") if parsed is not None else {}


def latent_recipe(
    cfg: RunConfig,
    dataset,
    autoencoder,
    text_encoder=None,
    *,
    shard_size: int = 256,
    dtype: str = "float32",
    limit: int | None = None,
) -> dict[str, Any]:
    """The recipe of an index.json (eflow.data.latent_shards.ShardEncoder): what is encoded, how, by
    which encoders with which options (defaults filled in), and the latents' shapes."""
    d = cfg.data
    ae = autoencoder
    has_images = bool(getattr(dataset, "image_indices", None))
    text = None
    if text_encoder is not None:
        text = {
            "name": d.text_encoder,
            "options": resolved_options("text_encoder", d.text_encoder, d.text_encoder_options),
            "dim": int(text_encoder.dim),
        }
    return {
        "dataset": {
            "name": d.name,
            "options": resolved_options("dataset", d.name, d.options),
            "seed": cfg.train.seed,
            "length": len(dataset),
            "limit": limit,
        },
        "clip": {"frames": d.frames, "height": d.height, "width": d.width},
        "autoencoder": {
            "name": d.autoencoder,
            "options": resolved_options("autoencoder", d.autoencoder, d.autoencoder_options),
            "latent_shape": list(ae.latent_shape((3, d.frames, d.height, d.width))),
            "image_latent_shape": list(ae.latent_shape((3, 1, d.height, d.width))) if has_images else None,
            "normalization": ae.normalization() if callable(getattr(ae, "normalization", None)) else None,
        },
        "text_encoder": text,
        "shard_size": shard_size,
        "dtype": dtype,
    }


def train_command(out: str | Path, cfg: RunConfig, with_text: bool) -> str:
    """The `eflow train` command line that trains on an encoded folder with the same encoders."""
    d = cfg.data
    words = ["eflow train --data latents --data-root", str(out), f"--frames {d.frames}"]
    words.append(f"--size {d.height}x{d.width}")
    if d.autoencoder != "pixel":
        words.append(f"--set data.autoencoder={d.autoencoder}")
        words += [f"--set data.autoencoder_options.{k}={v}" for k, v in d.autoencoder_options.items()]
    if with_text:
        words.append(f"--condition text --set data.text_encoder={d.text_encoder}")
        words += [f"--set data.text_encoder_options.{k}={v}" for k, v in d.text_encoder_options.items()]
    return " ".join(words)


@dataclass
class EncodeJob:
    """A ready encoder of a config's dataset into `out` (run it with job.encoder.run())."""

    cfg: RunConfig
    out: Path
    with_text: bool  # captions are encoded too
    encoder: ShardEncoder
    world: World  # this process among those torchrun started (rank 0 of 1 without it)

    def train_command(self) -> str:
        return train_command(self.out, self.cfg, self.with_text)

    def close(self) -> None:
        """Leave the process group prepare_encode joined (nothing to do in one process)."""
        shutdown(self.world)


def prepare_encode(
    cfg: RunConfig,
    out: str | Path,
    *,
    with_text: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    workers: int | None = None,
    shard_size: int = 256,
    dtype: str = "float32",
    limit: int | None = None,
) -> EncodeJob:
    """Build the dataset, the autoencoder and (with_text, or always for data.condition = "text") the
    text encoder of `cfg`, on `device`, and open `out` (new, or resumed when its recipe is the same).
    `workers` None: 0 for computed datasets, else a share of the CPUs (eflow.data.loader.auto_workers),
    divided among the ranks of a machine. Under torchrun, joins the process group first; a CUDA device
    becomes cuda:LOCAL_RANK."""
    d = cfg.data
    dtype = storage_dtype_name(dtype)
    with_text = with_text or d.condition == "text"
    resolved_options("dataset", d.name, d.options)  # bad options fail before the dataset is built
    ae_options = resolved_options("autoencoder", d.autoencoder, d.autoencoder_options)
    te_options = (
        resolved_options("text_encoder", d.text_encoder, d.text_encoder_options) if with_text else None
    )
    dev = resolve_device(device)
    world = init_world(dev)
    if world.size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    try:
        dataset = build_dataset(cfg)
        ae = get_registry("autoencoder").create(d.autoencoder, options=ae_options)
        te = get_registry("text_encoder").create(d.text_encoder, options=te_options) if with_text else None
        for part in (ae, te):
            if hasattr(part, "to"):
                part.to(dev)
        recipe = latent_recipe(cfg, dataset, ae, te, shard_size=shard_size, dtype=dtype, limit=limit)
        if workers is None:
            from eflow.data.loader import auto_workers

            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine
            workers = auto_workers([dataset])
            workers = max(1, workers // ranks_here) if workers else 0
        out = Path(out)
        encoder = ShardEncoder(
            dataset,
            ae,
            out,
            recipe,
            text_encoder=te,
            batch_size=batch_size,
            device=dev,
            workers=workers,
            world=world,
        )
    except BaseException:
        shutdown(world)  # an error in rank 0's index reaches every rank (ShardEncoder)
        raise
    return EncodeJob(cfg, out, with_text, encoder, world)
