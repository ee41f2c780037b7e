"""Fault injection: a crash at every stage of a save, a second process, a careless --overwrite, damaged
files. Each case either resumes to the uninterrupted run's exact losses or fails with one clear line, and
nothing committed is lost. Tiny CPU runs, no timing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from test_train import losses, tiny_config

from eflow.config import load_run_config
from eflow.errors import ConfigError, EflowError
from eflow.run_dir import CHECKPOINTS, checkpoint_dirs
from eflow.train import checkpoint
from eflow.train.run_lock import RunLock
from eflow.train.trainer import Trainer

STAGES = ["config", "model", "ema", "state", "manifest", "committed"]


class Crash(Exception):
    """Stands for SIGKILL or a full disk in the middle of a save."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "full"
    Trainer(tiny_config(out, save_every=2), progress=False).run()
    return losses(out)


def crash_in_save(monkeypatch, out, stage: str, step: int = 4) -> None:
    """Train the 6-step run in `out` (a checkpoint every 2 steps) and crash at `stage` of step `step`'s save."""
    save = checkpoint.save_checkpoint

    def crashing_save(run_dir, **kwargs):
        def crash_point(where):
            if kwargs["state"]["step"] == step and where == stage:
                raise Crash(where)

        return save(run_dir, crash_point=crash_point, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", crashing_save)
        with pytest.raises(Crash):
            Trainer(tiny_config(out, save_every=2), progress=False).run()


def resume(out, **kwargs) -> Trainer:
    trainer = Trainer(tiny_config(out, save_every=2), resume=True, progress=False, **kwargs)
    trainer.run()
    return trainer


@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_stage_of_a_save_leaves_a_resumable_run(tmp_path, monkeypatch, uninterrupted, stage):
    """Crash while committing step 4 (after step 2 was committed): resume continues from the newest
    committed checkpoint and the losses equal the uninterrupted run's."""
    out = tmp_path / "run"
    crash_in_save(monkeypatch, out, stage)
    committed = [p.name for p in checkpoint_dirs(out)]
    assert committed == (["step_00000002", "step_00000004"] if stage == "committed" else ["step_00000002"])
    assert not list((out / CHECKPOINTS).glob(".tmp-*"))  # an exception cleans up after itself
    resume(out)
    assert losses(out) == uninterrupted


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(tmp_path, monkeypatch, uninterrupted):
    """SIGKILL leaves a temp directory and temp files behind: the next start removes them and resumes."""
    out = tmp_path / "run"
    crash_in_save(monkeypatch, out, "committed")
    (out / CHECKPOINTS / ".tmp-step_00000006-dead").mkdir()
    (out / CHECKPOINTS / ".tmp-step_00000006-dead" / "model.safetensors").write_bytes(b"x" * 1000)
    (out / ".config.1234abcd.tmp.json").write_text("")
    resume(out)
    assert not list((out / CHECKPOINTS).glob(".tmp-*")) and not list(out.glob(".*.tmp*"))
    assert losses(out) == uninterrupted


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, save_every=1, keep_checkpoints=2), progress=False).run()
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000005", "step_00000006"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    crash_in_save(monkeypatch, out, "committed")
    newest = checkpoint_dirs(out)[-1]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-50] ^= 0x01
    (newest / "model.safetensors").write_bytes(bytes(data))
    warnings = []
    trainer = Trainer(tiny_config(out, save_every=2), resume=True, progress=False)
    trainer._warn = warnings.append
    trainer.run()
    assert "step_00000004 is unusable (model.safetensors does not match its SHA-256" in warnings[0]
    assert losses(out) == uninterrupted  # steps 2..3 were redone from step_00000002


def test_a_second_train_on_the_same_directory_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with (
        RunLock(out),
        pytest.raises(EflowError, match=rf"in use by another eflow train \(pid {os.getpid()} on"),
    ):
        Trainer(tiny_config(out), progress=False).run()
    assert not (out / "config.json").exists()  # the loser touched nothing
    Trainer(
        tiny_config(out, steps=1), progress=False
    ).run()  # released: the .lock file left behind is no lock


def test_overwrite_with_a_bad_config_keeps_the_old_run(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, steps=2), progress=False).run()
    bad = tiny_config(out, steps=2)
    bad.data.height = 6  # not divisible by tiny's 4x4 patch: found while building the model
    with pytest.raises(EflowError, match="not divisible by the patch size"):
        Trainer(bad, overwrite=True, progress=False).run()
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000002"]


def test_overwrite_moves_the_old_run_aside_until_the_new_one_commits(tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(tiny_config(out, steps=2), progress=False).run()
    save = checkpoint.save_checkpoint

    def crash(run_dir, **kwargs):
        raise Crash

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash)
    with pytest.raises(Crash):
        Trainer(tiny_config(out, steps=3, save_every=1), overwrite=True, progress=False).run()
    (aside,) = out.glob(".replaced-*")  # the old run waits there, whole
    assert [p.name for p in checkpoint_dirs(aside)] == ["step_00000002"]
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    Trainer(tiny_config(out, steps=3), overwrite=True, progress=False).run()
    assert not list(out.glob(".replaced-*")) and checkpoint_dirs(out)[-1].name == "step_00000003"


@pytest.mark.parametrize("content", [b"[1, 2]", b"null", b"\xff\xfe not text", b"{ torn"])
def test_a_damaged_config_json_is_one_clear_error(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"config\.json is corrupt"):
        load_run_config(tmp_path)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    crash_in_save(monkeypatch, out, "committed")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 0.5, "st')  # a crash mid-line
    resume(out)
    assert losses(out) == uninterrupted


def flat_run(tmp_path, uninterrupted_dir):
    """A run in the flat layout (before 2026-11-30) made from a committed checkpoint."""
    flat = tmp_path / "flat"
    flat.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"):
        (flat / name).write_bytes((uninterrupted_dir / name).read_bytes())
    return flat


def test_flat_layout_runs_resume_and_damaged_parts_are_named(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, steps=3), progress=False).run()
    flat = flat_run(tmp_path, checkpoint_dirs(out)[-1])
    Trainer(tiny_config(flat, steps=4), resume=True, progress=False).run()  # old runs still load
    assert checkpoint_dirs(flat)[-1].name == "step_00000004"

    flat = flat_run(tmp_path / "b", checkpoint_dirs(out)[-1])
    save_file({"mask_token": torch.zeros(7)}, str(flat / "ema.safetensors"), metadata={"step": "3"})
    with pytest.raises(EflowError, match="does not fit the model"):
        Trainer(tiny_config(flat, steps=4), resume=True, progress=False).run()

    flat = flat_run(tmp_path / "c", checkpoint_dirs(out)[-1])
    torch.save({"steps": 3}, flat / "trainer_state.pt")
    with pytest.raises(EflowError, match="not an eflow trainer state"):
        Trainer(tiny_config(flat, steps=4), resume=True, progress=False).run()


def test_manifest_records_every_file_with_its_hash(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, steps=1), progress=False).run()
    (latest,) = checkpoint_dirs(out)
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == {
        "config.json",
        "model.safetensors",
        "ema.safetensors",
        "trainer_state.pt",
    }
    assert checkpoint.verify(latest) is None


def test_a_full_disk_at_a_save_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    save = checkpoint.save_checkpoint

    def full_disk(run_dir, **kwargs):
        if kwargs["state"]["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(run_dir, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    with pytest.raises(EflowError, match=r"step 4 .*No space left on device; step_00000002 is intact"):
        Trainer(tiny_config(out, save_every=2), progress=False).run()
