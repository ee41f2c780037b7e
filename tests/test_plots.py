"""`eflow plot`: one PNG per metric group for several runs overlaid, the loss smoothed, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_train import tiny_config
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.errors import ConfigError, EflowError
from eflow.plots import ema, metric_groups, plot_runs, run_labels
from eflow.train.trainer import Trainer

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    Trainer(tiny_config(root / "a", steps=3), progress=False).run()
    Trainer(tiny_config(root / "b", steps=4, lr=3e-4), progress=False).run()
    return root / "a", root / "b"


def test_plot_writes_a_png_per_metric_group_for_two_runs(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["plot", *map(str, two_runs), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["loss.png", "lr.png", "throughput.png"]  # no validation fields recorded
    for name in names:
        with Image.open(tmp_path / "p" / name) as image:
            assert image.format == "PNG" and image.width > 500  # steps and wall-clock hours side by side
    assert "loss: " in result.output


def test_plot_defaults_to_the_first_runs_plots_folder_and_draws_validation_and_asked_fields(
    two_runs, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        json.dumps({"step": i, "loss": 1 / (i + 1), "lr": 1e-4, "val_fvd": 100 - i, "w": 2.0})
        for i in range(5)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a line torn by a crash
    paths = plot_runs([run, two_runs[0]], metrics=["w"], smooth=0)
    assert set(paths) == {"loss", "lr", "throughput", "validation", "metrics"}
    assert all(path.parent == run / "plots" and path.is_file() for path in paths.values())


def test_plot_errors_name_the_problem(two_runs, tmp_path):
    with pytest.raises(EflowError, match=r"has no metrics\.jsonl"):
        plot_runs([tmp_path])
    with pytest.raises(ConfigError, match=r"--smooth 1.0: give an EMA factor in \[0, 1\)"):
        plot_runs(two_runs, smooth=1.0)
    with pytest.raises(ConfigError, match=r"--metric nope: no run records it; fields: .*loss"):
        plot_runs(two_runs, metrics=["nope"])


def test_a_missing_matplotlib_is_one_line_naming_the_extra(two_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(app, ["plot", str(two_runs[0])])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "eflow plot needs matplotlib: pip install 'eflow[plots]'" in result.output


def test_ema_is_debiased_and_zero_means_raw():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start
    # means 0.5, then 0.5 * 0.5 + 0.5 * 3 = 1.75; debiased by 1 - 0.5 and 1 - 0.25
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75])
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_groups_and_labels():
    keys = ["step", "loss", "loss_fm", "lr", "it_s", "eval/fvd", "grad_norm"]
    assert metric_groups(keys) == {
        "loss": ["loss", "loss_fm"],
        "lr": ["lr"],
        "throughput": ["it_s"],
        "validation": ["eval/fvd"],
    }
    assert run_labels([Path("x/demo"), Path("y/demo"), Path("x/other")]) == ["x/demo", "y/demo", "other"]
