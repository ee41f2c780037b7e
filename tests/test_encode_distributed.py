"""`eflow data encode` under torchrun (2 gloo processes): the latents, captions and labels of every item
are bitwise those one process writes, skipped files merge into the same index, an interrupted run
resumes with any number of processes, and an error on rank 0 stops every rank.

Run as a script under torchrun, this file is a rank of the `interrupted` fixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_latents import PoolAutoencoder, folder_bytes, recipe
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.data.latent_shards import INDEX, LatentShards, ShardEncoder, part_name, read_index, shard_name
from eflow.data.skips import SkipEvent
from eflow.plugins.datasets.shapes import ShapesDataset
from eflow.plugins.text_encoders.hashed import HashedEncoder
from eflow.train.distributed import init_world

FRAMES, SIZE, ITEMS, SHARD = 8, 16, 22, 4  # 22 shapes clips of 8x16x16 in 6 shards: 4 x 5, then 2
ENCODE = ["data", "encode", "--data", "shapes", "--frames", FRAMES, "--size", SIZE, "--limit", ITEMS]
ENCODE += ["--shard-size", SHARD, "--batch-size", 3, "--device", "cpu", "--text-encoder", "hashed"]
ENCODE = [str(a) for a in ENCODE]
pytestmark = pytest.mark.slow  # five torchrun launches: about 25 s on 2 CPU cores

# Rank 0 writes shards 0, 2, 4 and rank 1 shards 1, 3, 5; the interrupted run stops rank 1 at shard 3,
# which leaves shards 0, 1, 2, 4 written: the rest is no tail of the dataset.
STOP_AT, WRITTEN = 3, (0, 1, 2, 4)


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def encode_on_two(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return torchrun("-m", "eflow.cli.app", *ENCODE, *extra, "--out", str(out))


def encode_on_one(out: Path, *extra: str):
    return CliRunner().invoke(app, [*ENCODE, *extra, "--out", str(out)])


def assert_same_items(folder: Path, reference: Path) -> None:
    """Every item read back (latents, label, caption, text tokens, dataset index) bitwise equal."""
    got, expected = LatentShards(folder), LatentShards(reference)
    assert len(got) == len(expected) > 0
    for k in range(len(expected)):
        a, b = got.item(k), expected.item(k)
        assert a.keys() == b.keys() == {"latents", "label", "caption", "text", "text_mask"}
        for key in ("latents", "text", "text_mask"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (k, key)
        assert (a["label"], a["caption"]) == (b["label"], b["caption"]), k
        assert got.dataset_index(k) == expected.dataset_index(k) == k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same command in one process."""
    out = tmp_path_factory.mktemp("one") / "lat"
    result = encode_on_one(out)
    assert result.exit_code == 0, result.output
    return out


def test_two_processes_write_the_latents_one_process_writes(tmp_path, one_process):
    """Each rank encodes every other shard with the batches one process uses, so the items, and here the
    files themselves, index.json included, are byte-identical; a rerun finds the folder complete."""
    out = tmp_path / "lat"
    proc = encode_on_two(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "encoding 6 of 6 shards on 2 processes (the bar shows rank 0's 3)" in proc.stderr
    assert proc.stdout.count("done: 22 items encoded, 0 skipped, 6 of 6 shards") == 1  # rank 0 reports
    assert_same_items(out, one_process)
    assert read_index(out) == read_index(one_process)
    assert folder_bytes(out) == folder_bytes(one_process)  # no part file left behind
    again = encode_on_two(out)
    assert again.returncode == 0 and again.stdout.count("already complete (22 items)") == 1


# ----- the worker: one rank of an encode with skipped files, then of an interrupted encode ----------


class BadFiles(ShapesDataset):
    """Shapes standing for files: one left out at start-up, items 2 and 7 unreadable, and items 3 (shard 1,
    rank 1) and 9 (shard 4, rank 0) from one corrupt file, whose first item is the one on record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = [SkipEvent("clips/never-opened.mp4", "unreadable", "moov atom not found")]

    def __getitem__(self, index):
        if index in (2, 7):
            raise OSError(f"invalid data found when processing input (clip {index})")
        if index in (3, 9):
            self.events.append(SkipEvent("clips/corrupt.mp4", "corrupt", f"decoding failed at item {index}"))
        return super().__getitem__(index)

    def take_skips(self):
        events, self.events = self.events, []
        return events

    def describe(self, index):
        return f"clips/{index:03d}.mp4"


def encode_bad_files(out: Path, world=None, limit: int = 10) -> dict:
    """The first `limit` items of BadFiles in shards of 2, through the pool autoencoder and an 8-d `hashed`."""
    ae, te = PoolAutoencoder(), HashedEncoder(dim=8)
    r = recipe(ae, te, shard_size=2)
    r["dataset"]["limit"] = limit
    encoder = ShardEncoder(BadFiles(2, 8, 8), ae, out, r, text_encoder=te, batch_size=3, world=world)
    return encoder.run()


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def worker(out: Path) -> None:
    """One rank: the BadFiles encode through the API, in 5 shards and in 1 (rank 1 has none), then
    `eflow data encode` where rank 1 is stopped (Ctrl-C) at shard STOP_AT once rank 0 has written all
    of its shards, so the run ends with both ranks' part files and nothing merged."""
    world = init_world(torch.device("cpu"))
    encode_bad_files(out / "bad-files", world)
    encode_bad_files(out / "one-shard", world, limit=2)

    real = ShardEncoder._encode_shard
    crashed = out / "crashed"

    def encode_shard(self, number, *args):
        if number == STOP_AT:
            part = crashed / part_name(0)

            def rank_0_done() -> bool:
                return part.is_file() and len(json.loads(part.read_text())["shards"]) == 3

            wait_for(rank_0_done, "rank 0's three shards")
            raise KeyboardInterrupt
        return real(self, number, *args)

    ShardEncoder._encode_shard = encode_shard
    app([*ENCODE, "--out", str(crashed)])


if __name__ == "__main__":  # a rank of the `interrupted` fixture
    worker(Path(sys.argv[1]))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """The worker's folder: bad-files/ and one-shard/ (complete), crashed/ (rank 1 interrupted)."""
    out = tmp_path_factory.mktemp("two")
    proc = torchrun(__file__, str(out))
    assert proc.returncode != 0, "the interrupted run should fail"
    assert (out / "bad-files" / INDEX).is_file(), proc.stderr[-4000:]
    assert "interrupted: rank 1 wrote 1 of its 3 shards" in proc.stderr, proc.stderr[-4000:]
    return out


def test_skipped_files_from_both_ranks_merge_into_the_one_process_index(tmp_path, interrupted):
    """Start-up skips once, unreadable items on either rank, and one corrupt file met by both ranks
    (recorded at its first item, on rank 1) make the index, and the shards, of one process."""
    expected = encode_bad_files(tmp_path / "one")
    assert [s["file"] for s in expected["skipped"]] == [
        "clips/never-opened.mp4", "clips/002.mp4", "clips/corrupt.mp4", "clips/007.mp4",
    ]  # fmt: skip
    assert expected["skipped"][2]["index"] == 3
    assert expected["counts"] == {"dataset_items": 10, "encoded": 6, "skipped": 4}
    assert read_index(interrupted / "bad-files") == expected
    assert folder_bytes(interrupted / "bad-files") == folder_bytes(tmp_path / "one")


def test_a_rank_with_no_shard_joins_and_the_encode_completes(tmp_path, interrupted):
    """One shard on two processes: rank 1 has nothing to do, waits for rank 0, and the folder is complete
    and the one a single process writes."""
    encode_bad_files(tmp_path / "one", limit=2)
    assert read_index(interrupted / "one-shard")["complete"]
    assert folder_bytes(interrupted / "one-shard") == folder_bytes(tmp_path / "one")


def test_an_interrupted_two_process_encode_resumes_with_two_or_one(tmp_path, interrupted, one_process):
    """The interrupted run leaves whole shards and both ranks' part files; a rerun on 2 processes merges
    them and encodes the two shards left, one a rank, and a rerun on 1 process does the same; the shards
    already written are not encoded again."""
    crashed = interrupted / "crashed"
    assert read_index(crashed)["shards"] == []  # nothing merged yet
    parts = [json.loads((crashed / part_name(r)).read_text())["shards"] for r in range(2)]
    assert [[p["shard"]["file"] for p in part] for part in parts] == [
        [shard_name(0), shard_name(2), shard_name(4)],
        [shard_name(1)],
    ]
    assert sorted(p.name for p in crashed.glob("shard-*")) == [shard_name(n) for n in WRITTEN]
    written = {n: (crashed / shard_name(n)).stat().st_ino for n in WRITTEN}
    on_one = tmp_path / "on-one"
    shutil.copytree(crashed, on_one)

    proc = encode_on_two(crashed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming" in proc.stderr and "4 of 6 shards done" in proc.stderr
    assert "encoding 2 of 6 shards on 2 processes (the bar shows rank 0's 1)" in proc.stderr
    assert {n: (crashed / shard_name(n)).stat().st_ino for n in WRITTEN} == written
    assert_same_items(crashed, one_process)
    assert folder_bytes(crashed) == folder_bytes(one_process)

    result = encode_on_one(on_one)
    assert result.exit_code == 0, result.output
    assert "4 of 6 shards done" in result.output
    assert_same_items(on_one, one_process)
    assert folder_bytes(on_one) == folder_bytes(one_process)


def test_an_error_on_rank_0_stops_every_rank_with_its_message(tmp_path, one_process):
    """Resuming with other settings is refused on rank 0; every rank exits with its message (none hangs
    in a collective, none encodes with the other settings)."""
    out = tmp_path / "lat"
    shutil.copytree(one_process, out)
    proc = encode_on_two(out, "--dtype", "bfloat16")
    assert proc.returncode != 0
    assert proc.stderr.count('recipe.dtype: "float32" in the index, "bfloat16" now') == 2  # both ranks
    assert folder_bytes(out) == folder_bytes(one_process)  # rank 1 wrote nothing either
