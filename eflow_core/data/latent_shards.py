"""Latent shards: a dataset encoded once by an autoencoder (and a text encoder), stored as safetensors.

Layout of an output folder:

    index.json                      what was encoded and how (the recipe), progress, shards, skipped files
    shard-00000.safetensors         dataset items [0, shard_size), then [shard_size, 2 * shard_size), ...
    index.rank-00001.json           under torchrun: a rank's shards, until rank 0 merges them into index.json

A shard holds the items of its index range that could be read, in dataset order (n of them, n_v
clips and n_i images):

    latents        [n_v, c, t, h, w]  normalized latents, exactly what autoencoder.encode returned
    image_latents  [n_i, c, 1, h, w]  the same for one-frame items (only when the dataset has images)
    is_image       bool [n]           which items are images (only when the dataset has images)
    index          int64 [n]          the dataset index of each item
    label          int64 [n]          class labels (when the dataset has them)
    text           [S, Dt]            text-encoder token states of all n captions, concatenated
    text_length    int64 [n]          real tokens per caption (S = their sum)
    metadata       {"captions": JSON list of n captions} (when the dataset has captions)

Latents and text are stored in the recipe's dtype (float32, bfloat16 or float16) and read as float32.

Resume: shards are written in order, each atomically (temp file + rename), and index.json is
rewritten atomically after each one, so an interrupted run leaves whole shards and an index that names
them; a rerun with the same recipe encodes the shards the index does not name. A partially written
shard is never visible. Batches never straddle shards and the text encoder's caption cache is emptied
at each shard, so a resumed run computes every shard exactly as an uninterrupted run does: the files
come out byte-identical (safetensors headers are deterministic, index.json holds no times).

Several processes (torchrun; `world`): the shards still to do are dealt out round-robin, shard n of
that list to rank n % world.size, and each rank writes its shards (whose names are theirs alone) and,
after each one, its part file index.rank-RANK.json. Once every rank is done, rank 0 merges the part
files into index.json and deletes them; a run that opens the folder merges what an interrupted one
left first, so a rerun with any number of processes encodes only the shards no file names. Each shard
is computed as one process computes it (same items, same batches), so the folder comes out
byte-identical whatever the number of processes. index.json is kept in one order however it was
filled: shards by start, skipped files by dataset index (start-up skips first, each file once).

Bad files are skipped, listed in index.json under "skipped" (index, file, reason) and counted; the
run goes on: files the dataset left out at start-up (its skip events, eflow.data.skips), an item whose
read raises (MediaError, OSError, ValueError, RuntimeError), and an item the dataset replaced by
another because its file failed to decode (it recorded skip events while reading it): the
replacement is not kept, since it is encoded at its own index. Items are read in the main process or
in DataLoader workers (`workers`), in order, so the output does not depend on the number of workers.
Each item is encoded as dataset[i], i.e. at epoch 0: a dataset with random temporal windows
contributes one fixed window per clip.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from eflow.atomic import atomic_path, atomic_write_text
from eflow.data.skips import MediaError, SkipEvent, take_skips
from eflow.data.text_cache import CaptionCache
from eflow.errors import ConfigError, EflowError
from eflow.train.distributed import World

FORMAT = "eflow-latents"
VERSION = 1
INDEX = "index.json"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Errors a dataset raises for one unreadable item (an undecodable or too-short file); EflowError
# (a configuration problem) is never one of them.
ITEM_ERRORS = (MediaError, OSError, ValueError, RuntimeError, EOFError)
PARTS = "index.rank-*.json"  # the part files of ranks (see the module docstring)
# Ranks wait for the slowest one before rank 0 merges: up to a shard's time and more, hence a long timeout.
SYNC_TIMEOUT = timedelta(hours=24)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def part_name(rank: int) -> str:
    return f"index.rank-{rank:05d}.json"


def read_index(folder: str | Path) -> dict[str, Any]:
    """The parsed index.json of a latent folder (checked to be one)."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise EflowError(
            f"{folder} holds no latents ({INDEX} is missing); write them with `eflow data encode`"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EflowError(f"{path} is not valid JSON: {err}") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise EflowError(
            f"{path} is not an eflow latent index (format {index.get('format')!r}, version "
            f"{index.get('version')!r}; expected {FORMAT!r}, {VERSION})"
        )
    return index


def write_index(folder: Path, index: dict[str, Any]) -> None:
    atomic_write_text(folder / INDEX, json.dumps(index, indent=1) + "\n")


def add_shards(index: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Add shard records ({"shard": {file, start, stop, items}, "skipped": [...], "text_max_tokens": n})
    to an index, leaving out shards it names already, and put it in its one order: shards by start,
    skipped files by dataset index (start-up skips first; a file once, where it was first met)."""
    named = {shard["file"] for shard in index["shards"]}
    for record in records:
        if record["shard"]["file"] in named:
            continue
        named.add(record["shard"]["file"])
        index["shards"].append(record["shard"])
        index["skipped"] += record["skipped"]
        index["text_max_tokens"] = max(index["text_max_tokens"], record["text_max_tokens"])
    index["shards"].sort(key=lambda shard: shard["start"])
    seen, skipped = set(), []
    for skip in sorted(index["skipped"], key=lambda s: -1 if s["index"] is None else s["index"]):
        if skip["file"] is None or skip["file"] not in seen:
            seen.add(skip["file"])
            skipped.append(skip)
    index["skipped"] = skipped
    index["counts"]["encoded"] = sum(shard["items"] for shard in index["shards"])
    index["counts"]["skipped"] = len(skipped)


def recipe_differences(old: Any, new: Any, where: str = "recipe") -> list[str]:
    """Dotted paths where two recipes differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += recipe_differences(old.get(key), new.get(key), f"{where}.{key}")
        return out
    return [] if old == new else [f"{where}: {json.dumps(old)} in the index, {json.dumps(new)} now"]


# ----- writing ------------------------------------------------------------------------------------


class ItemFetcher(Dataset):
    """Item k = (i, dataset[i] or None, why it is missing, the dataset's skip events) for i the k-th
    dataset index of `shards` (ascending shard numbers; shard n holds [n * shard_size, (n + 1) *
    shard_size) within [0, length), so only the last one can be short).

    Runs where the items are read (a DataLoader worker, or the main process), so the skip events a
    dataset records there travel back with the item.
    """

    def __init__(self, dataset, shards: list[int], shard_size: int, length: int):
        self.dataset, self.shards, self.shard_size = dataset, shards, shard_size
        self.count = sum(min((n + 1) * shard_size, length) - n * shard_size for n in shards)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[int, dict | None, str | None, list[SkipEvent]]:
        i = self.shards[k // self.shard_size] * self.shard_size + k % self.shard_size
        try:
            item = self.dataset[i]
            reason = None if item is not None else "the dataset returned no item"
        except EflowError:
            raise
        except ITEM_ERRORS as err:
            item, reason = None, f"{type(err).__name__}: {err}"
        return i, item, reason, take_skips(self.dataset)


def _as_is(x):
    return x


def _single_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the main process runs the encoders


class ShardEncoder:
    """Encodes a dataset into `out` shard by shard (see the module docstring).

    recipe: JSON-able description of the run (dataset {name, options, seed, length, limit}, clip,
    autoencoder {name, options, latent_shape, image_latent_shape, normalization}, text_encoder,
    shard_size, dtype); it must be identical when resuming. Items [0, limit) are encoded (all when
    limit is None). `describe(i)` names the file behind item i for the skip list (default: the
    dataset's own `describe` method, if it has one). `workers` > 0 reads items in DataLoader worker
    processes (in order). `world`: this process's rank among those torchrun started (every rank makes
    its own ShardEncoder; its process group must be initialized), one process when None.
    """

    def __init__(
        self,
        dataset,
        autoencoder,
        out: str | Path,
        recipe: dict[str, Any],
        *,
        text_encoder=None,
        batch_size: int = 8,
        device: torch.device | str = "cpu",
        workers: int = 0,
        describe: Callable[[int], str | None] | None = None,
        world: World | None = None,
    ):
        self.dataset, self.autoencoder, self.text_encoder = dataset, autoencoder, text_encoder
        self.out = Path(out)
        self.recipe = json.loads(json.dumps(recipe))  # plain JSON types, as read back from the index
        self.shard_size = int(recipe["shard_size"])
        self.storage_dtype = STORAGE_DTYPES[recipe.get("dtype", "float32")]
        ae = recipe["autoencoder"]
        self.latent_shape = tuple(ae["latent_shape"])
        image_shape = ae.get("image_latent_shape")
        self.image_latent_shape = tuple(image_shape) if image_shape else None
        clip = recipe["clip"]
        self.video_shape = (3, clip["frames"], clip["height"], clip["width"])
        self.image_shape = (3, 1, clip["height"], clip["width"])
        self.batch_size, self.workers = batch_size, workers
        self.device = torch.device(device)
        self.describe = describe or getattr(dataset, "describe", None) or (lambda i: None)
        limit = recipe["dataset"].get("limit")
        self.length = len(dataset) if limit is None else min(int(limit), len(dataset))  # items to encode
        self.num_shards = math.ceil(self.length / self.shard_size)
        self.world = world or World()
        self._group = None  # the gloo group the ranks wait on (CPU objects, long timeout)
        if self.world.size > 1:
            self._group = dist.new_group(backend="gloo", timeout=SYNC_TIMEOUT)
        self._part: list[dict[str, Any]] = []  # this rank's shard records, as in its part file
        startup = take_skips(self.dataset)  # files left out at start-up (on record by rank 0)
        self.index = self._on_main(lambda: self._open_index(startup))

    def _on_main(self, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """work() on rank 0 alone (it writes index.json, which it returns) while the other ranks wait, then
        read what it wrote; an EflowError there is raised on every rank."""
        if self.world.size == 1:
            return work()
        index, error = None, None
        if self.world.is_main:
            try:
                index = work()
            except EflowError as err:
                error = err
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0, group=self._group)
        if error is not None:
            raise error
        if message[0] is not None:
            raise EflowError(message[0])
        return index if self.world.is_main else read_index(self.out)

    def _open_index(self, startup: list[SkipEvent]) -> dict[str, Any]:
        if self.out.exists() and not self.out.is_dir():
            raise EflowError(f"--out {self.out} exists and is not a folder")
        if (self.out / INDEX).is_file():
            index = read_index(self.out)
            diffs = recipe_differences(index["recipe"], self.recipe)
            if diffs:
                raise EflowError(
                    f"{self.out} holds latents made differently; resuming needs the same settings:\n  "
                    + "\n  ".join(diffs)
                    + "\nuse another --out, or delete the folder to start over"
                )
            return self._merge_parts(index)  # its start-up skips are on record already
        if self.out.is_dir() and any(self.out.iterdir()):
            raise EflowError(f"--out {self.out} is not empty and holds no {INDEX}; choose an empty folder")
        found = [skip_record(None, event) for event in startup]
        index = {
            "format": FORMAT,
            "version": VERSION,
            "recipe": self.recipe,
            "num_classes": getattr(self.dataset, "num_classes", None),
            "classes": list(getattr(self.dataset, "classes", None) or []) or None,
            "text_max_tokens": 0,
            "counts": {"dataset_items": self.length, "encoded": 0, "skipped": len(found)},
            "shards": [],
            "skipped": found,
            "complete": self.length == 0,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_index(self.out, index)
        return index

    def _merge_parts(self, index: dict[str, Any]) -> dict[str, Any]:
        """Fold the ranks' part files (this run's, or an interrupted run's) into the index, write it, and
        delete them (a crash in between leaves files whose shards the index names: merged again, no harm)."""
        parts = sorted(self.out.glob(PARTS))
        if not parts:
            return index
        records = []
        for path in parts:
            try:
                part = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise EflowError(f"{path} is not valid JSON: {err}") from None
            records += part["shards"]
        add_shards(index, records)
        write_index(self.out, index)
        for path in parts:
            path.unlink()
        return index

    @property
    def shards_done(self) -> int:
        return len(self.index["shards"])

    @property
    def items_done(self) -> int:
        """Dataset items already behind completed shards (encoded or skipped)."""
        return sum(shard["stop"] - shard["start"] for shard in self.index["shards"])

    def todo(self, max_shards: int | None = None) -> list[int]:
        """The shards no file names yet (the first max_shards of them): the same list on every rank."""
        named = {shard["file"] for shard in self.index["shards"]}
        todo = [n for n in range(self.num_shards) if shard_name(n) not in named]
        return todo if max_shards is None else todo[:max_shards]

    def share(self, max_shards: int | None = None) -> list[int]:
        """This rank's shards of todo(max_shards): every world.size-th one, from the rank's own."""
        return self.todo(max_shards)[self.world.rank :: self.world.size]

    def items_in(self, shards: list[int]) -> int:
        """Dataset items of some shards."""
        return sum(min((n + 1) * self.shard_size, self.length) - n * self.shard_size for n in shards)

    def _items(self, shards: list[int]) -> Iterator[tuple[int, dict | None, str | None, list[SkipEvent]]]:
        fetcher = ItemFetcher(self.dataset, shards, self.shard_size, self.length)
        if self.workers == 0 or not shards:
            return (fetcher[k] for k in range(len(fetcher)))
        loader = DataLoader(
            fetcher,
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_as_is,
            prefetch_factor=4,
            worker_init_fn=_single_thread,
            generator=torch.Generator().manual_seed(0),  # a private one: the global RNG is not touched
        )
        return iter(loader)

    def run(
        self,
        max_shards: int | None = None,
        on_item: Callable[[], None] | None = None,
        on_skip: Callable[[dict], None] | None = None,
    ) -> dict[str, Any]:
        """Encode this rank's share of the shards not yet done (at most max_shards of them in all);
        returns the index, under torchrun once every rank is done and rank 0 has merged their shards.

        on_item() is called after each dataset item, on_skip(record) for each item skipped.
        """
        mine = self.share(max_shards)
        items = self._items(mine)
        for number in mine:
            self._encode_shard(number, items, on_item, on_skip)
        del items  # stops any worker processes
        if self.world.size > 1:
            dist.barrier(group=self._group)  # every rank's part file is written; ranks with none join too
        self.index = self._on_main(self._finish)
        return self.index

    def _finish(self) -> dict[str, Any]:
        """Rank 0: merge the ranks' shards into index.json, and mark it complete when no shard is missing."""
        index = self._merge_parts(self.index)
        if len(index["shards"]) == self.num_shards and not index["complete"]:
            if index["counts"]["encoded"] == 0:
                raise EflowError(
                    f"no item of the dataset could be read ({index['counts']['skipped']} skipped); "
                    f"see 'skipped' in {self.out / INDEX}"
                )
            index["complete"] = True
            write_index(self.out, index)
        return index

    def _check(self, i: int, item: dict) -> bool:
        """Whether item i is an image (a one-frame clip, when the recipe has images); checks its shape."""
        if "video" not in item:
            raise EflowError(f"dataset item {i} has no 'video' (keys: {', '.join(item)}); nothing to encode")
        shape = tuple(item["video"].shape)
        if shape == self.video_shape:
            return False
        if self.image_latent_shape is not None and shape == self.image_shape:
            return True
        raise EflowError(f"dataset item {i} has video shape {shape}, expected {self.video_shape}")

    def _skips(
        self, i: int, item, reason: str | None, events: list[SkipEvent], skipped: list[dict]
    ) -> list[dict]:
        """New skip records for item i (each file once per folder)."""
        records = [skip_record(i, e) for e in events]
        if item is None and not records:
            records = [{"index": i, "file": self.describe(i), "reason": reason}]
        known = {r["file"] for r in self.index["skipped"] + skipped if r["file"] is not None}
        new = [r for r in records if r["file"] is None or r["file"] not in known]
        skipped += new
        return new

    def _encode_shard(self, number: int, items, on_item, on_skip) -> None:
        start, stop = number * self.shard_size, min((number + 1) * self.shard_size, self.length)
        cache = getattr(self.text_encoder, "cache", None)
        if isinstance(cache, CaptionCache):
            cache.clear()  # the shard's text is computed as in any other run, interrupted or not
        skipped: list[dict] = []
        kept: list[tuple[int, bool, dict]] = []  # (dataset index, image?, the item's conditions)
        latents: dict[bool, list[Tensor]] = {False: [], True: []}  # per kind, in dataset order
        pending: dict[bool, list[tuple[int, Tensor]]] = {False: [], True: []}
        for _ in range(start, stop):
            i, item, reason, events = next(items)
            for record in self._skips(i, item, reason, events, skipped):
                if on_skip is not None:
                    on_skip(record)
            if item is not None and not events:  # events: the dataset replaced a failing file; keep neither
                image = self._check(i, item)
                kept.append((i, image, {k: v for k, v in item.items() if k != "video"}))
                pending[image].append((i, item["video"]))
                if len(pending[image]) == self.batch_size:
                    latents[image].append(self._encode_batch(pending[image], image))
                    pending[image] = []
            if on_item is not None:
                on_item()
        for image in (False, True):
            if pending[image]:
                latents[image].append(self._encode_batch(pending[image], image))
        tensors, captions = self._shard_tensors(kept, latents)
        name = shard_name(number)
        with atomic_path(self.out / name) as tmp:
            mode = tmp.stat().st_mode  # as open() gives under the umask; save_file recreates the file
            save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)} if captions else None)
            os.chmod(tmp, mode)
        longest = int(tensors["text_length"].max()) if "text_length" in tensors and len(kept) else 0
        shard = {"file": name, "start": start, "stop": stop, "items": len(kept)}
        record = {"shard": shard, "skipped": skipped, "text_max_tokens": longest}
        add_shards(self.index, [record])
        if self.world.size == 1:
            write_index(self.out, self.index)
        else:
            self._part.append(record)
            part = {"format": FORMAT, "version": VERSION, "rank": self.world.rank, "shards": self._part}
            atomic_write_text(self.out / part_name(self.world.rank), json.dumps(part, indent=1) + "\n")

    @torch.no_grad()
    def _encode_batch(self, batch: list[tuple[int, Tensor]], image: bool) -> Tensor:
        """Videos [3, T, H, W] of dataset items -> their latents [n, c, t, h, w] in the stored dtype."""
        expected = self.image_latent_shape if image else self.latent_shape
        video = torch.stack([v for _, v in batch]).to(self.device)
        out = self.autoencoder.encode(video).float().cpu()
        if tuple(out.shape[1:]) != expected:
            raise EflowError(f"the autoencoder returned {tuple(out.shape[1:])}, expected {expected}")
        for (i, _), lat in zip(batch, out, strict=True):
            if not torch.isfinite(lat).all():
                raise EflowError(f"the autoencoder returned non-finite latents for dataset item {i}")
        return out.to(self.storage_dtype)

    def _shard_tensors(
        self, kept: list[tuple[int, bool, dict]], latents: dict[bool, list[Tensor]]
    ) -> tuple[dict[str, Tensor], list[str]]:
        """The shard's tensors and its captions (empty when the dataset has none)."""
        tensors = {
            "latents": torch.cat(latents[False])
            if latents[False]
            else torch.zeros(0, *self.latent_shape, dtype=self.storage_dtype),
            "index": torch.tensor([i for i, _, _ in kept], dtype=torch.int64),
        }
        if self.image_latent_shape is not None:
            tensors["image_latents"] = (
                torch.cat(latents[True])
                if latents[True]
                else torch.zeros(0, *self.image_latent_shape, dtype=self.storage_dtype)
            )
            tensors["is_image"] = torch.tensor([image for _, image, _ in kept], dtype=torch.bool)
        conditions = [c for _, _, c in kept]
        for key in ("label", "caption"):
            if len({key in c for c in conditions}) > 1:
                raise EflowError(f"some dataset items have a '{key}' and others not")
        if conditions and "label" in conditions[0]:
            tensors["label"] = torch.tensor([int(c["label"]) for c in conditions], dtype=torch.int64)
        captions = (
            [str(c["caption"]) for c in conditions] if conditions and "caption" in conditions[0] else []
        )
        if self.text_encoder is not None:
            if conditions and not captions:
                raise EflowError("a text encoder was given but the dataset yields no 'caption'")
            rows = self._text_rows(captions)
            dim = int(self.recipe["text_encoder"]["dim"])
            tensors["text"] = torch.cat(rows) if rows else torch.zeros(0, dim, dtype=self.storage_dtype)
            tensors["text_length"] = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        return {k: v.contiguous() for k, v in tensors.items()}, captions

    @torch.no_grad()
    def _text_rows(self, captions: list[str]) -> list[Tensor]:
        """Each caption's real-token states [n_i, Dt] (stored dtype), encoded batch_size captions at a time."""
        rows = []
        for at in range(0, len(captions), self.batch_size):
            emb, mask = self.text_encoder.encode(captions[at : at + self.batch_size])
            for row, keep in zip(emb.float().cpu(), mask.cpu().bool(), strict=True):
                rows.append(row[keep].to(self.storage_dtype))  # the real tokens, in order
        return rows


def skip_record(i: int | None, event: SkipEvent) -> dict:
    """index.json's record of a skipped file (i = the dataset index, None for a start-up skip)."""
    return {"index": i, "file": event.path, "reason": f"{event.reason}: {event.detail}"}


# ----- reading ------------------------------------------------------------------------------------


class LatentShards:
    """Random access to the items of a latent folder: item(k) for k in [0, len) over all shards.

    Shards are memory-mapped (safetensors safe_open) on first use in each process, so a reader made
    before DataLoader workers fork opens its own handles in every worker. `image_indices` lists the
    items that are images (one-frame clips).
    """

    def __init__(self, folder: str | Path, *, allow_incomplete: bool = False):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        if not self.index["complete"] and not allow_incomplete:
            done, total = len(self.index["shards"]), self._total_shards()
            raise EflowError(
                f"the latents in {self.folder} are incomplete ({done} of {total} shards); "
                "rerun the same `eflow data encode` command to finish them"
            )
        self.recipe = self.index["recipe"]
        self.text_dim = (self.recipe.get("text_encoder") or {}).get("dim")
        self._where: list[tuple[int, int, bool, int]] = []  # item -> (shard, row, image?, row among its kind)
        self._labels: list[Tensor | None] = []
        self._captions: list[list[str] | None] = []
        self._text_offsets: list[Tensor | None] = []
        for number, shard in enumerate(self.index["shards"]):
            path = self.folder / shard["file"]
            if not path.is_file():
                raise EflowError(f"{path} is missing; the index {self.folder / INDEX} names it")
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                self._labels.append(f.get_tensor("label") if "label" in names else None)
                captions = (f.metadata() or {}).get("captions")
                self._captions.append(json.loads(captions) if captions else None)
                offsets = None
                if "text_length" in names:
                    offsets = torch.cat(
                        [torch.zeros(1, dtype=torch.int64), f.get_tensor("text_length").cumsum(0)]
                    )
                self._text_offsets.append(offsets)
                is_image = (
                    f.get_tensor("is_image").tolist() if "is_image" in names else [False] * shard["items"]
                )
            if len(is_image) != shard["items"]:
                raise EflowError(f"{path} holds {len(is_image)} items, the index says {shard['items']}")
            count = {False: 0, True: 0}
            for row, image in enumerate(is_image):
                self._where.append((number, row, image, count[image]))
                count[image] += 1
        self.image_indices = [k for k, (_, _, image, _) in enumerate(self._where) if image]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _total_shards(self) -> int:
        recipe = self.index["recipe"]
        return math.ceil(self.index["counts"]["dataset_items"] / int(recipe["shard_size"]))

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, number: int):
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            path = self.folder / self.index["shards"][number]["file"]
            self._handles[number] = safe_open(str(path), framework="pt")
        return self._handles[number]

    def item(self, k: int) -> dict[str, Any]:
        """{"latents": float32 [c, t, h, w]} plus "label", "caption", and "text" [n, Dt] with "text_mask" [n]
        (n = the caption's real tokens, at least 1: an empty caption gives one masked zero token)."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} latent items")
        number, row, image, kind_row = self._where[k % len(self)]
        f = self._handle(number)
        out: dict[str, Any] = {
            "latents": f.get_slice("image_latents" if image else "latents")[kind_row].float()
        }
        if self._labels[number] is not None:
            out["label"] = int(self._labels[number][row])
        if self._captions[number] is not None:
            out["caption"] = self._captions[number][row]
        offsets = self._text_offsets[number]
        if offsets is not None:
            lo, hi = int(offsets[row]), int(offsets[row + 1])
            text = torch.zeros(max(1, hi - lo), self.text_dim)
            mask = torch.zeros(max(1, hi - lo), dtype=torch.bool)
            if hi > lo:
                text[:] = f.get_slice("text")[lo:hi].float()
                mask[:] = True
            out["text"], out["text_mask"] = text, mask
        return out

    def dataset_index(self, k: int) -> int:
        """The index of item k in the dataset that was encoded."""
        number, row, _, _ = self._where[k]
        return int(self._handle(number).get_slice("index")[row])


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the spellings of --precision


def storage_dtype_name(name: str) -> str:
    """The stored dtype's name for --dtype NAME (float32, bfloat16, float16, or fp32, bf16, fp16)."""
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in STORAGE_DTYPES:
        choices = ", ".join([*STORAGE_DTYPES, *DTYPE_ALIASES])
        raise ConfigError(f"--dtype {name!r}: choose one of {choices}")
    return canonical


def check_storage_dtype(name: str) -> torch.dtype:
    return STORAGE_DTYPES[storage_dtype_name(name)]
