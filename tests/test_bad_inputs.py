"""Careless and hostile inputs: each is one `error:` line (exit 2) or handled, and nothing written is lost.

Sampling writes its files as one set, batches its work and validates its flags like the config; sizes
that cannot fit fail before anything is allocated; damaged caches, non-UTF-8 files, a mismatched
optimizer state and a backend returning the wrong shape are named. Tiny CPU runs, no timing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_train import tiny_config
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.config import load_toml
from eflow.errors import EflowError
from eflow.eval.frechet import FeatureStats
from eflow.eval.real_stats import load_stats, save_stats
from eflow.loaded_run import load_run
from eflow.model.dit import build_model
from eflow.output_set import STAGE_PREFIX
from eflow.registry import get_registry
from eflow.sample_run import BATCH_SEED_STRIDE, sample_run
from eflow.train import checkpoint
from eflow.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    Trainer(tiny_config(out, steps=2), progress=False).run()
    return out


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:"), result.output
    for needle in needles:
        assert needle in result.output, result.output


# ----- eflow sample ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--guidance", "nan"], "--guidance nan"),
        (["--guidance", "-5"], "--guidance -5.0"),
        (["--steps", "0"], "--steps 0"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--num", "0"], "--num 0"),
        (["--num", "65"], "--each"),
        (["--sampler", "nope"], "unknown sampler 'nope'; choices: euler"),
    ],
)
def test_bad_sampling_flags_are_one_error_naming_the_flag_and_keep_earlier_samples(
    tmp_path, run_dir, flags, named
):
    out = tmp_path / "samples"
    assert invoke("sample", run_dir, "--out", out, "--num", 2).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_error_line(invoke("sample", run_dir, "--out", out, *flags), named)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sampling_is_batched_and_reproducible_for_a_seed_and_batch_size(tmp_path, run_dir, monkeypatch):
    import eflow.sample_run as module

    generate, calls = module.generate, []

    def recording(model, autoencoder, cond, *args, **kwargs):
        videos = generate(model, autoencoder, cond, *args, **kwargs)
        calls.append((len(cond), kwargs["seed"], videos))
        return videos

    monkeypatch.setattr(module, "generate", recording)
    sample_run(load_run(run_dir, CPU), tmp_path / "batched", num=5, batch_size=2, seed=3)
    assert [(n, seed) for n, seed, _ in calls] == [
        (2, 3),
        (2, 3 + BATCH_SEED_STRIDE),
        (1, 3 + 2 * BATCH_SEED_STRIDE),
    ]
    first = [videos for _, _, videos in calls]
    calls.clear()
    sample_run(load_run(run_dir, CPU), tmp_path / "again", num=5, batch_size=2, seed=3)
    for a, b in zip(first, [videos for _, _, videos in calls], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same seed and batch size: the same videos


def test_each_writes_every_video_and_a_new_call_replaces_the_whole_set(tmp_path, run_dir):
    out = tmp_path / "samples"
    assert invoke("sample", run_dir, "--out", out, "--num", 3, "--each").exit_code == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000.mp4", "000001.mp4", "000002.mp4"]
    assert invoke("sample", run_dir, "--out", out, "--num", 2, "--each").exit_code == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        "000000.mp4",
        "000001.mp4",
    ]  # no stale third
    assert invoke("sample", run_dir, "--out", out, "--num", 2).exit_code == 0
    assert not (out / "videos").exists()  # a set without --each leaves no videos of an earlier one
    assert not list(out.glob(f"{STAGE_PREFIX}*"))


def test_ctrl_c_while_sampling_keeps_the_previous_set_whole(tmp_path, run_dir, monkeypatch):
    import eflow.sample_run as module

    out = tmp_path / "samples"
    assert invoke("sample", run_dir, "--out", out, "--num", 4, "--batch-size", 2).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    generate, calls = module.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(module, "generate", interrupted)
    result = invoke("sample", run_dir, "--out", out, "--num", 4, "--batch-size", 2, "--seed", 9)
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_stage_left_by_a_killed_sampler_is_removed(tmp_path, run_dir):
    out = tmp_path / "samples"
    dead = out / f"{STAGE_PREFIX}999999999-abc"  # no such pid
    dead.mkdir(parents=True)
    (dead / "samples.mp4").write_bytes(b"half")
    assert invoke("sample", run_dir, "--out", out, "--num", 1).exit_code == 0
    assert not dead.exists() and (out / "samples.mp4").stat().st_size > 4


def test_ctrl_c_at_start_up_is_one_line(run_dir, monkeypatch):
    import eflow.loaded_run as module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "build_parts", interrupted)
    result = invoke("sample", run_dir)
    assert result.exit_code == 130 and result.output.strip().startswith("interrupted")


# ----- sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags", [["--size", "100000"], ["--size", "2048"], ["--set", "data.frames=1000000000"]]
)
def test_sizes_that_cannot_fit_fail_before_allocating(tmp_path, flags):
    result = invoke("train", "--out", tmp_path / "run", "--device", "cpu", "--steps", "1", *flags)
    one_error_line(result, "training needs at least", "activations kept for backward", "--batch-size")
    assert not (tmp_path / "run" / "config.json").exists()


def test_an_allocation_failure_inside_a_step_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, run_dir, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)

    def no_memory(self, step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Trainer, "train_step", no_memory)
    with pytest.raises(EflowError, match=r"out of memory in step 3 .* step_00000002 is intact"):
        Trainer(tiny_config(out, steps=4), resume=True, progress=False).run()


# ----- damaged or foreign files ---------------------------------------------------------------------
def test_a_truncated_statistics_cache_is_a_cache_miss(tmp_path):
    stats = FeatureStats(4)
    stats.update(np.random.default_rng(0).normal(size=(8, 4)))
    path = tmp_path / "stats.npz"
    save_stats(path, stats, {"dataset": "shapes"})
    assert load_stats(path) is not None
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert load_stats(path) is None  # recomputed, not a BadZipFile traceback


def test_a_non_utf8_toml_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b'[train]\nsteps = 3\nout = "caf\xe9"\n')
    with pytest.raises(EflowError, match=r"run\.toml:3: not UTF-8 text \(byte 0xe9"):
        load_toml(path)
    one_error_line(invoke("train", "--config", path), "run.toml:3: not UTF-8")


def test_a_non_utf8_captions_manifest_names_the_file(tmp_path):
    manifest = tmp_path / "captions.jsonl"
    manifest.write_bytes(b'{"path": "a.mp4", "caption": "caf\xe9"}\n')
    with pytest.raises(EflowError, match=r"captions\.jsonl:1: not UTF-8"):
        get_registry("dataset").create("captions", 2, 8, 8, options={"root": str(manifest)})


def test_an_optimizer_state_that_does_not_fit_is_one_clear_error(run_dir):
    out = run_dir
    trainer = Trainer(tiny_config(out, steps=4), resume=True, progress=False)
    trainer._setup()
    saved = trainer.optimizer.state_dict()
    first = next(iter(saved["state"]))
    saved["state"][first]["exp_avg"] = torch.zeros(3)  # a moment of another shape
    with pytest.raises(EflowError, match=r"optimizer holds exp_avg of shape \(3,\)"):
        checkpoint.restore_optimizer(trainer.optimizer, saved, out)
    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:1]  # another parameter count
    with pytest.raises(EflowError, match="does not fit this model"):
        checkpoint.restore_optimizer(trainer.optimizer, saved, out)


def test_a_backend_returning_the_wrong_shape_is_named():
    from eflow.model.self_attention import SelfAttention
    from eflow.registry import hookimpl, host

    class Truncating(SelfAttention):
        def attend(self, q, k, v, ctx, x):
            return v[:, :1]

    class Plugin:
        @hookimpl
        def register_attention(self, register):
            register("truncating", Truncating)

    host().register(Plugin(), name="wrong-shape-plugin")
    try:
        model = build_model("tiny", attention="truncating", in_channels=3, num_classes=2)
        x = torch.randn(1, 3, 2, 8, 8)
        t = torch.rand(1)
        from eflow.condition import Condition

        with pytest.raises(
            EflowError, match=r"attention 'truncating' \(plugin 'wrong-shape-plugin'\): attend"
        ):
            model(x, t, t, Condition(labels=torch.zeros(1, dtype=torch.long)))
    finally:
        host().unregister("wrong-shape-plugin")


def test_sampling_a_checkpoint_writes_beside_the_run_not_into_the_checkpoint(tmp_path):
    """A checkpoint folder may be deleted by retention: its samples go to RUN/samples/step_N."""
    from eflow.sample_run import default_samples_dir

    run = tmp_path / "run"
    assert default_samples_dir(run) == run / "samples"
    assert default_samples_dir(run / "checkpoints" / "step_00000250") == run / "samples" / "step_00000250"
    assert (
        default_samples_dir(tmp_path / "exports" / "step_00000250")
        == tmp_path / "exports" / "step_00000250" / "samples"
    )
