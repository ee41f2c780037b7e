"""`eflow eval` end to end on tiny runs: train-extractor, eval (indomain and i3d), compare, clear errors."""

import json

import pytest
import torch
from test_cli import TINY
from test_eval import TinyI3D
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.eval.classifier_training import WEAK_CLASSIFIER

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's deprecation notice

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})  # wide: tables unwrapped


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def assert_clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in text, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    ok(run("train", "--steps", 2, "--out", out, *TINY))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, run_dir):
    """A tiny in-domain classifier for the run's dataset and clip shape (4x8x8), taken from the run."""
    cache = tmp_path_factory.mktemp("cache")
    result = ok(
        run(
            "eval", "train-extractor", "--run", run_dir, "--train-clips", 200, "--heldout-clips", 50,
            "--epochs", 1, "--net-width", 8, "--device", "cpu", "--cache-dir", cache,
        )
    )  # fmt: skip
    assert "held-out accuracy" in " ".join(result.output.split())
    assert len(list((cache / "extractors").glob("indomain-shapes-4x8x8-*.safetensors"))) == 1
    return cache


def evaluate(run_dir, cache, *extra):
    return run(
        "eval", run_dir, "--num", 12, "--batch-size", 8, "--device", "cpu", "--cache-dir", cache, *extra
    )


def test_eval_writes_eval_json_with_every_protocol_detail(run_dir, cache):
    result = ok(evaluate(run_dir, cache, "--steps", 1, "--guidance", 2.0, "--seed", 3))
    assert "in-domain FVD" in result.output and "sample class accuracy" in result.output
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metric_label"] == "in-domain FVD" and report["metrics"]["fvd"] >= 0
    fvd = report["fvd"]
    assert fvd["label"] == "in-domain FVD" and fvd["comparable_to_published_fvd"] is False
    assert fvd["n_real"] == fvd["n_fake"] == 12 and fvd["covariance"] == "N-1 (unbiased)"
    # 12 clips for 32-dimensional features (a tiny extractor): said plainly in the table, not as scipy's LinAlgWarning
    assert fvd["feature_dim"] == 32 and "LinAlgWarning" not in result.output
    assert "unreliable: 12 clips for 32-dimensional features" in " ".join(result.output.split())
    assert fvd["extractor"]["name"] == "indomain" and fvd["extractor"]["content_hash"].startswith("sha256:")
    assert fvd["extractor"]["protocol"]["frames"] == 4 and "8x8" in fvd["extractor"]["protocol"]["resolution"]
    assert fvd["real"]["dataset"] == "shapes" and fvd["real"]["cache_hit"] is False
    s = report["sampling"]
    assert (s["sampler"], s["steps"], s["guidance"], s["seed"]) == ("solution", 1, 2.0, 3)
    assert (
        report["run"]["step"] == 2
        and report["date"]
        and report["clip"] == {"frames": 4, "height": 8, "width": 8}
    )
    acc = report["accuracy"]
    assert 0 <= acc["value"] <= 1 and sum(row["n"] for row in acc["per_class"].values()) == 12
    weak = acc["classifier"]["heldout_accuracy"] < WEAK_CLASSIFIER  # a tiny test classifier may be
    assert ("the in-domain classifier's held-out accuracy is" in result.output) == weak


def test_a_second_eval_reuses_the_cached_real_statistics_and_compare_charts_both(run_dir, cache, tmp_path):
    ok(evaluate(run_dir, cache, "--steps", 1, "--metric", "fvd"))
    ok(evaluate(run_dir, cache, "--steps", 2, "--metric", "fvd", "--out", tmp_path / "two.json"))
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["fvd"]["real"]["cache_hit"] is True and "accuracy" not in report
    chart = tmp_path / "chart.png"
    result = ok(run("eval", "compare", run_dir, tmp_path / "two.json", "--out", chart))
    assert "in-domain FVD" in result.output and "two.json" in result.output
    assert chart.is_file() and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_with_a_torchscript_i3d_file(run_dir, cache, tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.script(TinyI3D().eval()).save(str(path))
    out = tmp_path / "i3d.json"
    args = ["--extractor", "i3d", "--i3d-path", path, "--metric", "fvd", "--out", out]
    assert_clean_error(evaluate(run_dir, cache, *args), "uses 16 frames per clip but the clips have 4")
    explicit = ["eval", "run", run_dir, "--num", 12, "--device", "cpu", "--cache-dir", cache]  # the long form
    ok(run(*explicit, *args, "--extractor-option", "frames=4", "--cov", "n"))
    report = json.loads(out.read_text())
    assert report["metric_label"] == "FVD (I3D)" and report["fvd"]["extractor"]["dim"] == 400
    assert report["fvd"]["covariance"] == "N (maximum likelihood)"
    assert report["fvd"]["comparable_to_published_fvd"] is False  # 4 frames, not the standard 16


def test_bad_input_gives_one_error_line(run_dir, cache, tmp_path):
    assert_clean_error(evaluate(tmp_path / "nope", cache), "run directory not found")
    assert_clean_error(evaluate(run_dir, cache, "--metric", "fvd,bleu"), "choose from fvd, accuracy")
    assert_clean_error(evaluate(run_dir, cache, "--extractor", "nope"), "unknown feature_extractor 'nope'")
    assert_clean_error(evaluate(run_dir, cache, "--i3d-path", "x.pt"), "--i3d-path is for --extractor i3d")
    assert_clean_error(
        evaluate(run_dir, tmp_path / "empty-cache"),
        "no in-domain classifier",
        "eflow eval train-extractor --data shapes --frames 4 --size 8x8 --cache-dir",
    )
    assert_clean_error(run("eval", "compare", tmp_path), "eval.json not found")


def test_a_sampler_option_overrides_the_runs_and_is_recorded(run_dir, cache, tmp_path):
    """--sampler-option shift=1.0 samples on another time grid (other clips, another FVD) and the report
    records it; a misspelt option is one error naming it and the sampler's fields."""
    reports = []
    for extra in ([], ["--sampler-option", "shift=1.0"]):
        ok(evaluate(run_dir, cache, "--metric", "fvd", "--out", tmp_path / f"{len(reports)}.json", *extra))
        reports.append(json.loads((tmp_path / f"{len(reports)}.json").read_text()))
    assert [r["sampling"]["sampler_options"]["shift"] for r in reports] == [3.0, 1.0]
    assert reports[0]["metrics"]["fvd"] != reports[1]["metrics"]["fvd"]
    assert_clean_error(evaluate(run_dir, cache, "--sampler-option", "shiftt=1"), "shiftt", "shift")
    assert_clean_error(evaluate(run_dir, cache, "--sampler-option", "shift"), "--sampler-option 'shift'")


def test_accuracy_needs_a_label_conditioned_run(tmp_path, cache):
    out = tmp_path / "text"
    ok(run("train", "--steps", 1, "--condition", "text", "--out", out, *TINY))
    assert_clean_error(evaluate(out, cache, "--metric", "accuracy"), "needs a label-conditioned run")


def test_a_mistyped_subcommand_is_named_not_taken_for_a_run_directory():
    result = run("eval", "train-extractr", "--data", "shapes")
    assert result.exit_code == 2
    assert "Did you mean 'train-extractor'" in result.output
