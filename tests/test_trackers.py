"""--track: trackers get every metric and preview the trainer writes, a resumed run continues the same
tracked run without duplicates, a missing package is one line naming the extra. tensorboard and wandb
are optional: fakes stand in for their writers, and TensorBoard's own reader checks the real writer's
files where the package is installed (the dev extras). Also: --data captions infers --condition text."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
from test_train import tiny_config
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.errors import ConfigError, EflowError
from eflow.registry import hookimpl, host
from eflow.run_config import resolve_run_config
from eflow.train import trackers
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer


class FakeEventFiles:
    """What TensorBoard would show of a log directory: events by (tag, step); a writer opened with
    purge_step P hides the earlier writers' events at steps >= P, as TensorBoard does."""

    dirs: ClassVar[dict[str, dict]] = {}

    def __init__(self, log_dir, purge_step=None):
        self.events = self.dirs.setdefault(log_dir, {"scalars": {}, "images": {}, "text": {}, "opened": []})
        self.events["opened"].append(purge_step)
        if purge_step is not None:
            for kind in ("scalars", "images"):
                self.events[kind] = {k: v for k, v in self.events[kind].items() if k[1] < purge_step}
        self.closed = False

    def add_scalar(self, tag, value, step, walltime=None):
        assert (tag, step) not in self.events["scalars"], f"{tag} logged twice at step {step}"
        self.events["scalars"][(tag, step)] = (value, walltime)

    def add_image(self, tag, pixels, step, dataformats):
        assert dataformats == "HWC" and pixels.ndim == 3 and pixels.shape[2] == 3
        self.events["images"][(tag, step)] = pixels.shape

    def add_text(self, tag, text, step):
        self.events["text"][(tag, step)] = text

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeEventFiles.dirs = {}
    monkeypatch.setattr(trackers.TensorBoardTracker, "require", staticmethod(lambda: FakeEventFiles))
    return FakeEventFiles.dirs


def crash_in_step_4_then_resume(out: Path, after_crash=None) -> None:
    """A tracked tiny run of 4 steps that crashes in its 4th (steps 0..2 logged, the checkpoint of 2
    steps kept), `after_crash()`, then the resumed run to the end."""
    original = Trainer.train_step

    def crash_in_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    Trainer.train_step = crash_in_step_3
    try:
        with pytest.raises(EflowError, match="aborted during step 4"):
            Trainer(tiny_config(out, steps=4, save_every=2, preview_every=2, track=["tensorboard"]),
                    progress=False).run()  # fmt: skip
    finally:
        Trainer.train_step = original
    if after_crash is not None:
        after_crash()
    Trainer(tiny_config(out, steps=4, save_every=2, preview_every=2, track=["tensorboard"]), resume=True,
            progress=False).run()  # fmt: skip


def metrics_by_tag_and_step(out: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """(tag, step) -> (value, wall time) of every numeric field of the run's metrics.jsonl."""
    return {
        (key, record["step"]): (float(value), record["time"])
        for record in read_metrics(out / "metrics.jsonl")
        for key, value in record.items()
        if key not in ("step", "time")
    }


def test_tensorboard_gets_every_metric_and_preview_and_resume_adds_no_duplicates(tmp_path, fake_tensorboard):
    out = tmp_path / "run"

    def logged_before_resume():
        events = fake_tensorboard[str(out / "tensorboard")]
        assert {step for _, step in events["scalars"]} == {0, 1, 2}  # step 2 logged before the crash

    crash_in_step_4_then_resume(out, logged_before_resume)
    events = fake_tensorboard[str(out / "tensorboard")]
    assert events["opened"] == [0, 2]  # a fresh run, then purge from the checkpoint's step
    expected = metrics_by_tag_and_step(out)
    assert events["scalars"] == expected  # every metric of metrics.jsonl, once, with its wall time
    assert {"loss", "lr", "it_s", "grad_norm"} <= {tag for tag, _ in expected}
    # previews after 2 steps (before the crash) and after 4 (the end), at their last step's index
    assert sorted(events["images"]) == [("preview", 1), ("preview", 3)]
    assert ("config", 0) in events["text"]


def test_tensorboards_own_reader_sees_every_metric_once_after_a_crash_and_resume(tmp_path):
    """The real SummaryWriter and TensorBoard's own EventAccumulator (the tensorboard package, in the
    dev extras): what TensorBoard shows is metrics.jsonl, with the crashed run's step 2 replaced."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    crash_in_step_4_then_resume(out)
    shown = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    shown.Reload()
    events = [(tag, event) for tag in shown.Tags()["scalars"] for event in shown.Scalars(tag)]
    seen = {(tag, event.step): (event.value, event.wall_time) for tag, event in events}
    expected = metrics_by_tag_and_step(out)
    assert len(events) == len(seen)  # no (tag, step) twice: the crashed run's step 2 is purged
    assert seen.keys() == expected.keys()  # every metric at every step
    for key, (value, wall_time) in expected.items():
        assert seen[key][0] == pytest.approx(value, rel=1e-6, abs=1e-12), key  # float32 in the events
        assert seen[key][1] == pytest.approx(wall_time, abs=1e-3), key
    assert [event.step for event in shown.Images("preview")] == [1, 3]
    assert "config/text_summary" in shown.Tags()["tensors"]


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    def not_installed():
        raise EflowError(trackers.missing("tensorboard", "track", "tensorboard"))

    monkeypatch.setattr(trackers.TensorBoardTracker, "require", staticmethod(not_installed))
    args = ["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--track", "tensorboard"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--track tensorboard needs the tensorboard package: pip install 'eflow[track]'" in result.output
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run starts
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlflow' .*choices: tensorboard, wandb"):
        resolve_run_config(flags={"track": ["mlflow"]})


def test_wandb_runs_offline_and_a_resumed_run_continues_the_same_id(tmp_path, monkeypatch):
    calls = []

    class Run:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def log(self, data, step):
            calls.append(("log", step, sorted(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        init=lambda **kwargs: Run(**kwargs),
        Image=lambda path: ("image", Path(path).name),
        util=types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}"),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    Trainer(tiny_config(out, steps=2, track=["wandb"]), progress=False).run()
    Trainer(tiny_config(out, steps=3, track=["wandb"]), resume=True, progress=False).run()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["mode"] for i in inits] == ["offline", "offline"] and inits[0]["id"] == inits[1]["id"]
    assert inits[0]["resume"] == "allow" and inits[0]["config"]["train"]["track"] == ["wandb"]
    assert [c[1] for c in calls if c[0] == "log" and "loss" in c[2]] == [0, 1, 2]
    assert [c[1] for c in calls if c[0] == "log" and c[2] == ["preview"]] == [1, 2]
    assert [c[0] for c in calls].count("finish") == 2


def test_a_failing_tracker_is_switched_off_with_a_warning():
    class Broken:
        def log(self, step, record):
            raise OSError("disk full")

        def close(self):
            raise AssertionError("a failed tracker is not closed again")

    warnings = []
    group = trackers.Trackers({"broken": Broken()}, warn=warnings.append)
    group.log(0, {"loss": 1.0})
    group.log(1, {"loss": 1.0})
    group.close()
    assert warnings == ["tracker broken failed (OSError: disk full); it is off for the rest of the run"]


def test_scalars_are_the_numeric_fields_but_step_and_time():
    record = {"step": 3, "time": 1.0e9, "loss": 0.5, "stage": 1, "name": "x", "flag": True}
    assert trackers.scalars(record) == {"loss": 0.5, "stage": 1.0}


# ----- data.condition inferred --------------------------------------------------------------------
class TextOnlyClips:
    """A dataset plugin registered with labels=False."""

    @hookimpl
    def register_datasets(self, register):
        register("text-only-test", object, labels=False)


def test_condition_text_is_inferred_when_not_given_and_said_in_a_note():
    notes = []
    flags = {"data": "captions", "data_root": "clips.jsonl", "text_encoder": "hashed-words"}
    cfg = resolve_run_config(flags=flags, notes=notes)
    assert cfg.data.condition == "text"
    assert notes == ["data.condition = text (a text encoder was chosen; --condition label to override)"]
    explicit = resolve_run_config(flags={"text_encoder": "hashed-words", "condition": "label"})
    assert explicit.data.condition == "label"  # a given condition wins
    assert resolve_run_config().data.condition == "label"  # shapes has labels
    assert resolve_run_config(sets=["data.text_encoder=hashed-words"]).data.condition == "text"


def test_a_dataset_registered_without_labels_infers_text():
    notes = []
    flags = {"data": "captions", "data_root": "clips.jsonl"}  # the built-in captions dataset: labels=False
    assert resolve_run_config(flags=flags, notes=notes).data.condition == "text"
    assert notes == [
        "data.condition = text (dataset 'captions' has no class labels; --condition label to override)"
    ]
    name = host().register(TextOnlyClips(), name="text-only-test-plugin")
    try:
        notes = []
        assert resolve_run_config(flags={"data": "text-only-test"}, notes=notes).data.condition == "text"
        assert notes == ["data.condition = text (dataset 'text-only-test' has no class labels; "
                         "--condition label to override)"]  # fmt: skip
    finally:
        host().unregister(name)


def test_train_prints_the_inferred_condition(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--text-encoder", "hashed-words", "--out", str(tmp_path / "r"), "--print-config"]
    )
    assert result.exit_code == 0, result.output
    assert "note: data.condition = text (a text encoder was chosen" in result.output
    assert '"condition": "text"' in result.output
