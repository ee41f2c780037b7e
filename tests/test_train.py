"""The trainer: the loss falls, resume after a crash is exact, torchrun with 2 gloo processes works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eflow.config import build_config
from eflow.errors import EflowError
from eflow.run_dir import checkpoint_dirs
from eflow.train import trainer as trainer_mod
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer


def tiny_tree(out, **train):
    """The config tree of a run small enough for a 2-core CPU: 2 frames of 8x8 pixels, the tiny preset."""
    return {
        "data": {"frames": 2, "height": 8, "width": 8},
        "train": {
            "steps": 6,
            "batch_size": 4,
            "lr": 1e-3,
            "out": str(out),
            "preview_every": 0,
            "device": "cpu",
            **train,
        },
        "sample": {"num": 2, "steps": 2},
    }


def tiny_config(out, **train):
    """A run small enough for a 2-core CPU: 2 frames of 8x8 pixels, the tiny preset."""
    return build_config(tiny_tree(out, **train))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_boundary_and_resume_continues_exactly(tmp_path, monkeypatch, signame):
    """EFlow recipe (pdg-sfm + MVA, sprint drop then dense): SIGINT/SIGTERM during step 3 stops after it,
    commits step 4, and the resumed run's losses equal the uninterrupted run's."""
    import signal

    Trainer(tiny_config(tmp_path / "full"), progress=False).run()
    expected = losses(tmp_path / "full")
    assert len(expected) == 6

    original = Trainer.train_step

    def signal_during_step_3(self, step):
        if step == 3:
            os.kill(os.getpid(), getattr(signal, signame))
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", signal_during_step_3)
    with pytest.raises(EflowError, match=f"stopped by {signame} after step 4; the run is saved"):
        Trainer(tiny_config(tmp_path / "stopped"), progress=False).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert losses(tmp_path / "stopped") == expected[:4]
    assert [p.name for p in checkpoint_dirs(tmp_path / "stopped")] == ["step_00000004"]

    Trainer(tiny_config(tmp_path / "stopped"), resume=True, progress=False).run()
    assert losses(tmp_path / "stopped") == expected  # bit-exact on CPU


def test_an_abort_inside_a_step_saves_nothing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A second signal (KeyboardInterrupt mid-step) may come after the optimizer step: no checkpoint is
    written for it, the committed one stays, and resume redoes the lost steps exactly."""
    Trainer(tiny_config(tmp_path / "full"), progress=False).run()
    expected = losses(tmp_path / "full")
    original = Trainer.train_step

    def abort_in_step_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", abort_in_step_4)
    with pytest.raises(EflowError, match="aborted during step 5; step_00000004 is intact"):
        Trainer(tiny_config(tmp_path / "run", save_every=2), progress=False).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(tiny_config(tmp_path / "run", save_every=2), resume=True, progress=False).run()
    assert losses(tmp_path / "run") == expected


def test_a_non_finite_loss_stops_the_run_before_the_weights_change(tmp_path, monkeypatch):
    """The step's one host copy (loss, gradient norm, metrics) is checked before the optimizer step: a NaN
    loss stops the run naming the step, and the weights stay finite."""
    import torch

    setup = Trainer._setup

    def setup_with_nan_in_step_3(self):
        setup(self)
        original = self.objective.loss

        def nan_in_step_3(net, batch, info):
            out = original(net, batch, info)
            if info.step == 3:
                out.loss = out.loss * float("nan")
            return out

        self.objective.loss = nan_in_step_3

    monkeypatch.setattr(Trainer, "_setup", setup_with_nan_in_step_3)
    trainer = Trainer(tiny_config(tmp_path / "run"), progress=False)
    with pytest.raises(EflowError, match="loss is nan at step 3; lower --lr or check the data"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert len(losses(tmp_path / "run")) == 3  # steps 0-2 logged


def test_objective_metrics_reach_the_host_in_one_copy_as_exact_floats():
    """to_floats: tensors (any dtype, 0-dim or 1-element) and plain numbers, in their order, fp64 exact."""
    import torch

    from eflow.objective import to_floats

    values = {"a": torch.tensor(0.1, dtype=torch.float64), "n": 3, "b": torch.tensor([2]), "w": 2.5}
    assert to_floats(values) == {"a": 0.1, "n": 3.0, "b": 2.0, "w": 2.5}
    assert list(to_floats(values)) == ["a", "n", "b", "w"]
    assert to_floats({}) == {}


def test_existing_run_is_not_overwritten_without_a_flag(tmp_path):
    Trainer(tiny_config(tmp_path / "run", steps=1), progress=False).run()
    with pytest.raises(EflowError, match="already holds a run; pass --resume"):
        Trainer(tiny_config(tmp_path / "run", steps=1), progress=False).run()
    with pytest.raises(EflowError, match="already at step 1 of 1"):
        Trainer(tiny_config(tmp_path / "run", steps=1), resume=True, progress=False).run()


def test_fm_loss_falls_on_shapes(tmp_path):
    cfg = tiny_config(tmp_path / "fm", steps=40, lr=2e-3, batch_size=8)
    cfg.objective.name, cfg.objective.options = "fm", {}
    cfg.model.attention = "softmax"
    Trainer(cfg, progress=False).run()
    loss = losses(tmp_path / "fm")
    first, last = sum(loss[:8]) / 8, sum(loss[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_step_seed_differs_per_step_and_seed():
    seeds = {trainer_mod.step_seed(seed, s) for seed in range(2) for s in range(50)}
    assert len(seeds) == 100


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    """`torchrun --nproc_per_node 2 eflow train`: data sharded per rank, rank 0 logs and checkpoints."""
    eflow = Path(sys.executable).parent / "eflow"
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(eflow), "train",
        "--steps", "3", "--batch-size", "4", "--frames", "2", "--size", "8", "--device", "cpu", "--threads", "1",
        "--out", str(out), "--set", "train.preview_every=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # written once, by rank 0
    (latest,) = checkpoint_dirs(out)  # written once, by rank 0
    assert (latest / "model.safetensors").is_file() and (latest / "trainer_state.pt").is_file()


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    """World-size invariance: the objectives draw a sample's noise, times, groups and drops for the step's
    global batch from a seed every rank shares and keep their rows, and the token-drop plan keys a
    sample's kept tokens by its global row and pass, so `torchrun --nproc_per_node 2` and one process at
    the same global batch log the same losses (the EFlow objective: SPRINT dropping, then MVA)."""
    eflow = Path(sys.executable).parent / "eflow"
    flags = [
        "train", "--steps", "4", "--batch-size", "4", "--frames", "4", "--size", "8", "--device", "cpu",
        "--threads", "1", "--token-drop", "sprint", "--set", "train.preview_every=0", "--lr", "3e-2",
        "--set", "schedule.stages=[{start=0.0,end=0.75,drop_ratio=0.5},{start=0.75,end=1.0,mva_share=0.25}]",
    ]  # fmt: skip  # lr 3e-2: from AdaLN-Zero's start the middle stack (and so the drop) matters after a step
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd, out in (([*torchrun, str(eflow)], "two"), ([str(eflow)], "one")):
        proc = subprocess.run([*cmd, *flags, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("two", "one"))
    assert [r["drop_ratio"] for r in one] == [0.5, 0.5, 0.5, 0.0]  # rank-seeded drops: off by 3e-3 at step 3
    assert [r["n_mva"] for r in one] == [0, 0, 0, 1]  # MVA on: the groups are split over the ranks
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_fm_run_logs_what_it_does_no_drop_and_no_mva(tmp_path):
    """`--objective fm --token-drop none` under the EFlow stage schedule: every step is dense, without MVA."""
    cfg = tiny_config(tmp_path / "fm", steps=5)
    cfg.objective.name, cfg.objective.options = "fm", {}
    cfg.token_drop.name = "none"
    Trainer(cfg, progress=False).run()
    records = read_metrics(tmp_path / "fm" / "metrics.jsonl")
    assert {(r["drop_ratio"], r["mva_share"]) for r in records} == {(0.0, 0.0)}
    assert trainer_mod.progress_info(records[0]).endswith("stage 0 (dense)")


def test_eflow_run_logs_its_drop_then_its_mva_share(tmp_path):
    Trainer(tiny_config(tmp_path / "ef", steps=5), progress=False).run()
    records = read_metrics(tmp_path / "ef" / "metrics.jsonl")
    assert [(r["drop_ratio"], r["mva_share"]) for r in records] == [(0.75, 0.0)] * 4 + [(0.0, 0.25)]
    assert trainer_mod.progress_info(records[0]).endswith("stage 0 (drop 0.75)")
    assert trainer_mod.progress_info(records[-1]).endswith("stage 1 (dense, mva 0.25)")


def test_warmup_then_cosine_learning_rate_is_logged(tmp_path):
    Trainer(
        tiny_config(tmp_path / "lr", steps=6, lr=1e-3, warmup_steps=2, lr_schedule="cosine"), progress=False
    ).run()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "lr" / "metrics.jsonl")]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] < lrs[3] < lrs[2]


def test_pixel_statistics_are_fitted_once_and_recorded_for_resume_and_sampling(tmp_path):
    import json

    cfg = tiny_config(tmp_path / "norm", steps=2)
    cfg.data.autoencoder_options = {"normalize": True}
    Trainer(cfg, progress=False).run()
    options = json.loads((tmp_path / "norm" / "config.json").read_text())["data"]["autoencoder_options"]
    assert len(options["mean"]) == 3 and all(-1 < m < 0 for m in options["mean"])  # dark shapes clips
    assert all(0 < s < 1 for s in options["std"])
    resumed = tiny_config(tmp_path / "norm", steps=3)
    resumed.data.autoencoder_options = options
    Trainer(resumed, resume=True, progress=False).run()
    after = json.loads((tmp_path / "norm" / "config.json").read_text())["data"]["autoencoder_options"]
    assert after == options  # not refitted on resume


def test_a_drop_schedule_on_clips_of_few_tokens_gets_a_note(tmp_path):
    """The tiny run's 8 tokens (2 frames of 8x8 pixels) with SPRINT's 75% drop: one note at start-up
    naming what the middle blocks keep and how to turn dropping off; none without dropping."""
    from io import StringIO

    from rich.console import Console

    outputs = {}
    for name, drop in (("drop", "sprint"), ("dense", "none")):
        cfg = tiny_config(tmp_path / name, steps=1)
        cfg.token_drop.name = drop
        buffer = StringIO()
        trainer = Trainer(cfg, progress=False, console=Console(file=buffer, width=400))
        trainer._check_run_dir()
        trainer._setup()
        outputs[name] = buffer.getvalue()
    assert "note: 8 tokens per clip: the drop stage keeps 2 in the middle blocks" in outputs["drop"]
    assert "--token-drop none turns it off" in outputs["drop"]
    assert "note:" not in outputs["dense"]
