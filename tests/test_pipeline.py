"""The Python pipeline: the videos of `eflow sample` for the same seed, every output type, step callbacks
(also from samplers that predate them), and `import eflow` staying light. Tiny CPU runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_config
from typer.testing import CliRunner

from eflow import Pipeline
from eflow.cli.app import app
from eflow.condition import Condition
from eflow.data.video_io import read_video
from eflow.errors import ConfigError, EflowError
from eflow.pipeline import BATCH_SEED_STRIDE, DEFAULT_CAPTION, PipelineOutput
from eflow.registry import get_registry, hookimpl, host
from eflow.sampler import Sampler, takes_callback
from eflow.sampling import generate as preview_generate
from eflow.train.trainer import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    Trainer(tiny_config(out, steps=2), progress=False).run()
    return out


@pytest.fixture(scope="module")
def pipe(run_dir):
    return Pipeline.from_run(run_dir, device="cpu")


def test_the_pipeline_gives_the_videos_eflow_sample_writes_for_the_same_seed(pipe, run_dir, tmp_path):
    out = pipe(num=3, seed=5, batch_size=2, progress=False)
    result = CliRunner().invoke(
        app,
        ["sample", str(run_dir), "--num", "3", "--seed", "5", "--batch-size", "2", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    pipe.save(out, tmp_path / "pipeline.png")  # the same frame grid, lossless
    written = np.asarray(Image.open(tmp_path / "samples.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pipeline.png")), written)
    # and the same draws as the training previews' generate: batch b seeded with seed + b * stride
    run, settings = pipe.run, pipe.plan(num=3).settings
    labels = torch.arange(3) % pipe.num_classes
    expected = [
        preview_generate(
            run.parts.model,
            run.parts.autoencoder,
            Condition(labels=labels[start : start + 2]),
            run.parts.latent_shape,
            sampler="solution",
            sampler_options=settings.sampler_options,
            steps=settings.steps,
            guidance=settings.guidance,
            seed=5 + b * BATCH_SEED_STRIDE,
            device=torch.device("cpu"),
        )
        for b, start in enumerate((0, 2))
    ]
    torch.testing.assert_close(out.tensor, torch.cat(expected), rtol=0, atol=0)


def test_sampler_options_override_the_runs_in_the_pipeline_and_in_eflow_sample(pipe, run_dir, tmp_path):
    """sampler_options={"shift": 1.0} (eflow sample --sampler-option shift=1.0) samples on another grid:
    other videos than the run's shift 3, and the same ones from both; a misspelt option names itself."""
    default = pipe(num=2, seed=3, progress=False).tensor
    shifted = pipe(num=2, seed=3, sampler_options={"shift": 1.0}, progress=False)
    assert not torch.equal(default, shifted.tensor)
    cli = ["sample", str(run_dir), "-n", "2", "--seed", "3", "--sampler-option", "shift=1.0"]
    result = CliRunner().invoke(app, [*cli, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pipe.save(shifted, tmp_path / "pipeline.png")
    written = np.asarray(Image.open(tmp_path / "samples.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pipeline.png")), written)
    with pytest.raises(ConfigError, match="shiftt"):
        pipe(num=1, sampler_options={"shiftt": 1.0}, progress=False)


def test_the_pipeline_and_the_previews_share_one_generate():
    import eflow.pipeline

    assert eflow.pipeline.generate is preview_generate


def test_output_types_are_a_tensor_uint8_frames_or_pil_images(pipe):
    frames, size = pipe.run.cfg.data.frames, pipe.run.cfg.data.height
    tensor = pipe(labels=[1, 0], steps=1, progress=False)
    assert isinstance(tensor, PipelineOutput) and len(tensor) == 2
    assert tensor.videos.shape == (2, 3, frames, size, size) and tensor.videos.dtype == torch.float32
    assert tensor.videos.min() >= -1 and tensor.videos.max() <= 1
    array = pipe(labels=[1, 0], steps=1, output_type="numpy", progress=False).videos
    assert array.shape == (2, frames, size, size, 3) and array.dtype == np.uint8
    pil = pipe(labels=[1, 0], steps=1, output_type="pil", progress=False).videos
    assert [len(video) for video in pil] == [frames, frames] and pil[0][0].size == (size, size)
    np.testing.assert_array_equal(np.asarray(pil[1][-1]), array[1, -1])
    with pytest.raises(ConfigError, match="output_type 'np': choose tensor, numpy, pil"):
        pipe(steps=1, output_type="np")


def test_callback_on_step_end_is_called_once_per_step_of_every_batch(pipe):
    calls = []
    out = pipe(
        labels=[0, 1, 2],
        steps=3,
        batch_size=2,
        progress=False,
        callback_on_step_end=lambda step, total, latents: calls.append((step, total, latents.shape[0])),
    )
    assert calls == [(0, 3, 2), (1, 3, 2), (2, 3, 2), (0, 3, 1), (1, 3, 1), (2, 3, 1)]
    assert len(out) == 3


@pytest.mark.parametrize("name", ["euler", "solution"])
def test_built_in_samplers_call_back_after_every_step_with_the_latents(name):
    sampler = get_registry("sampler").create(name)
    assert takes_callback(sampler)
    model = lambda x, t, s, cond, w, path: -x  # noqa: E731
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = Condition(labels=torch.zeros(2, dtype=torch.long))
    seen = []
    out = sampler.sample(
        model, noise, cond, 4, 2.0, generator=torch.Generator().manual_seed(1),
        callback=lambda step, total, x: seen.append((step, total, x.clone())),
    )  # fmt: skip
    assert [(step, total) for step, total, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    torch.testing.assert_close(seen[-1][2], out, rtol=0, atol=0)
    plain = sampler.sample(model, noise, cond, 4, 2.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, out, rtol=0, atol=0)  # the callback changes nothing


class OldSampler(Sampler):
    """A third-party sampler written before `callback` existed: one jump x - F."""

    def sample(self, model, noise, cond, steps, guidance=4.0, generator=None):
        t = torch.ones(noise.shape[0])
        w = torch.full_like(t, float(guidance))
        return noise - model(noise, t, torch.zeros_like(t), cond, w, path="full")


class OldSamplerPlugin:
    @hookimpl
    def register_samplers(self, register):
        register("old-jump", OldSampler)


def test_a_sampler_without_callback_still_samples_and_refuses_only_step_callbacks(pipe):
    name = host().register(OldSamplerPlugin(), name="old-sampler-plugin")
    try:
        assert not takes_callback(OldSampler())
        out = pipe(labels=[0], sampler="old-jump", progress=True)  # the bar ticks per batch
        assert out.sampler == "old-jump" and out.tensor.shape[0] == 1
        with pytest.raises(EflowError, match="sampler 'old-jump' reports no steps"):
            pipe(labels=[0], sampler="old-jump", callback_on_step_end=lambda *a: None)
    finally:
        host().unregister(name)


def test_a_generator_drives_the_noise_and_the_same_generator_seed_repeats(pipe):
    a = pipe(labels=[0, 1], generator=torch.Generator().manual_seed(7), progress=False)
    b = pipe(labels=[0, 1], generator=torch.Generator().manual_seed(7), progress=False)
    c = pipe(labels=[0, 1], generator=torch.Generator().manual_seed(8), progress=False)
    torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0)
    assert not torch.equal(a.tensor, c.tensor) and a.seed is None
    with pytest.raises(ConfigError, match="seed or generator, not both"):
        pipe(seed=1, generator=torch.Generator())


def test_labels_by_id_or_class_name_are_checked_against_the_run(pipe):
    names = pipe.class_names
    by_name = pipe(labels=[names[2], names[0]], steps=1, seed=3, progress=False)
    by_id = pipe(labels=[2, 0], steps=1, seed=3, progress=False)
    torch.testing.assert_close(by_name.tensor, by_id.tensor, rtol=0, atol=0)
    assert len(pipe(labels=4, num=3, steps=1, progress=False)) == 3  # one label, num videos
    with pytest.raises(ConfigError, match=r"label 99 is out of range; this run has classes 0\.\.\d+"):
        pipe(labels=[99])
    with pytest.raises(ConfigError, match="unknown class name 'nope'"):
        pipe(labels=["nope"])
    with pytest.raises(ConfigError, match="prompts need a text-conditioned run"):
        pipe(prompts=["a red square"])


def test_save_writes_mp4_gif_or_png_by_suffix(pipe, tmp_path):
    out = pipe(labels=[0, 1], steps=1, progress=False)
    frames = pipe.run.cfg.data.frames
    assert read_video(out.save(tmp_path / "a" / "out.mp4")).shape[0] == frames
    assert Image.open(pipe.save(out, tmp_path / "out.gif")).n_frames >= 1
    assert pipe.save(out.tensor[0], tmp_path / "one.png").is_file()  # one video [C, T, H, W]
    with pytest.raises(EflowError, match=r"use a name ending in \.mp4, \.gif or \.png"):
        out.save(tmp_path / "out.avi")


def test_a_text_run_takes_prompts(tmp_path):
    out = tmp_path / "text"
    cfg = tiny_config(out, steps=1)
    cfg.data.condition = "text"
    Trainer(cfg, progress=False).run()
    pipe = Pipeline.from_run(out, device="cpu")
    videos = pipe(prompts=["a red square moving left", "a cyan circle growing"], steps=1, progress=False)
    assert len(videos) == 2 and pipe.condition == "text"
    assert len(pipe(prompts="a red square", num=3, steps=1, progress=False)) == 3
    # what the captions were, where the call did not say them all
    assert pipe.plan(prompts=["a red square"], num=3).notes == ["1 caption(s) taken in turn for 3 videos"]
    assert pipe.plan(num=2).notes == [
        f"no caption given: every video shows {DEFAULT_CAPTION!r} (--caption TEXT)"
    ]
    assert pipe.plan(prompts=["a", "b"]).notes == []
    with pytest.raises(ConfigError, match="labels need a class-conditioned run"):
        pipe(labels=[0])


def test_import_eflow_stays_light_and_pipeline_is_exported_lazily():
    code = (
        "import sys, eflow\nassert 'torch' not in sys.modules\nassert eflow.Pipeline.__name__ == 'Pipeline'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "Pipeline" in dir(__import__("eflow"))
