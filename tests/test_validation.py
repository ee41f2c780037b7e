"""Validation during training (config [validation], --eval-every): every n steps the EMA weights are
sampled and measured with eflow eval's core; the val_* fields land in metrics.jsonl, and a run with
validation trains exactly as one without (sampling draws from its own generators)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_eval import i3d_file  # noqa: F401  (a tiny TorchScript I3D: FVD without training a classifier)
from test_train import losses, tiny_config

from eflow.config import build_config
from eflow.errors import ConfigError
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer


def validation_table(i3d, **validation) -> dict:
    """A [validation] section for tiny runs: FVD of 4 clips every 2 steps, with the TorchScript I3D `i3d`."""
    return {
        "every": 2,
        "num": 4,
        "batch_size": 2,
        "metrics": ["fvd"],
        "extractor": "i3d",
        "extractor_options": {"path": str(i3d), "frames": 2},
        **validation,
    }


def validated_config(out, i3d, **validation):
    cfg = tiny_config(out, steps=4)
    cfg.validation = cfg.validation.model_validate(validation_table(i3d, **validation))
    return cfg


def test_validation_logs_fvd_every_n_steps_and_leaves_training_unchanged(tmp_path, i3d_file):  # noqa: F811
    Trainer(tiny_config(tmp_path / "plain", steps=4), progress=False).run()
    console = Console(file=io.StringIO(), width=200)
    Trainer(validated_config(tmp_path / "val", i3d_file), console=console, progress=False).run()
    assert losses(tmp_path / "val") == losses(tmp_path / "plain")  # the training RNG stream is untouched
    printed = [line for line in console.file.getvalue().splitlines() if line.startswith("validation")]
    assert [line.split(":")[0] for line in printed] == ["validation at step 2", "validation at step 4"]
    assert all(" FVD " in line and line.endswith(" s)") for line in printed), printed
    records = read_metrics(tmp_path / "val" / "metrics.jsonl")
    validated = [r["step"] for r in records if "val_fvd" in r]
    assert validated == [1, 3]  # after steps 2 and 4
    assert all(r["val_fvd"] >= 0 and r["val_s"] > 0 for r in records if "val_fvd" in r)


def test_validation_settings_are_checked():
    with pytest.raises(ConfigError, match=r"validation.metrics"):
        build_config({"validation": {"metrics": []}})
    with pytest.raises(ConfigError, match=r"validation.every"):
        build_config({"validation": {"every": -1}})
    with pytest.raises(ConfigError, match=r"validation.metrics.0"):
        build_config({"validation": {"metrics": ["psnr"]}})


def test_a_missing_classifier_fails_before_the_first_step(tmp_path, monkeypatch):
    """--eval-every with no in-domain classifier trained for the run's clips: the error (naming the command
    that trains one) comes at start-up, not after `every` steps of training that would then be lost."""
    from eflow.errors import EflowError

    monkeypatch.setenv("EFLOW_CACHE_DIR", str(tmp_path / "empty_cache"))
    cfg = tiny_config(tmp_path / "run", steps=4)
    cfg.validation = cfg.validation.model_validate({"every": 2, "num": 4, "metrics": ["accuracy"]})
    with pytest.raises(EflowError, match="eflow eval train-extractor"):
        Trainer(cfg, progress=False).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
