"""`eflow bench attention` and `eflow bench plot` on the CPU at tiny sizes: files, records, errors."""

import csv
import json

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from eflow.bench.attention import BACKWARD_FLOPS_FACTOR, failure_status
from eflow.bench.grids import grid_for_tokens, parse_token_count, sweep_grids
from eflow.cli.app import app
from eflow.errors import ConfigError
from eflow.model.self_attention import SelfAttention
from eflow.plugins.attention.softmax import sdpa
from eflow.registry import get_registry, hookimpl, host

runner = CliRunner()

TINY = ["--heads", "2", "--head-dim", "8", "--device", "cpu", "--warmup", "1", "--repeats", "2"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# ----- test backends, registered in-process ------------------------------------------------------------
class BrokenAttention(SelfAttention):
    """attend raises: the sweep must record it and go on."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx, x: Tensor) -> Tensor:
        raise RuntimeError("deliberately broken")


class OutOfMemoryAttention(SelfAttention):
    """attend raises an out-of-memory error, as a too-large cell on a GPU would."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx, x: Tensor) -> Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


class TokenMixer(nn.Module):
    """A non-default FFN (stands in for Sana's Mix-FFN): called as ffn(x, ctx)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx) -> Tensor:
        return self.mix(x)


class OwnFFNAttention(SelfAttention):
    """Softmax attention that brings its own FFN."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx, x: Tensor) -> Tensor:
        return sdpa(q, k, v)

    def feed_forward(self, dim: int, hidden: int) -> nn.Module:
        return TokenMixer(dim, hidden)


class HalfOnlyAttention(SelfAttention):
    """Refuses fp32 with a ConfigError, as softmax with kernel = flash or cudnn does on a GPU."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx, x: Tensor) -> Tensor:
        if q.dtype == torch.float32:
            raise ConfigError("half-only-test: fp32 refused")
        return sdpa(q, k, v)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx, x: Tensor) -> Tensor:
        return sdpa(q, k, v)


class BenchTestPlugin:
    @hookimpl
    def register_attention(self, register):
        register("half-only-test", HalfOnlyAttention, summary="refuses fp32 (test)")
        register("broken-test", BrokenAttention, summary="raises in attend (test)")
        register("oom-test", OutOfMemoryAttention, summary="runs out of memory (test)")
        register("own-ffn-test", OwnFFNAttention, summary="brings its own FFN (test)")


@pytest.fixture
def test_backends():
    name = host().register(BenchTestPlugin(), name="bench-test-backends")
    yield
    host().unregister(name)


# ----- the main sweep ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "attention"
    args = ["bench", "attention", "--attn", "softmax,glga", "--tokens", "64,128", "--drop", "0,0.5"]
    result = run(*args, "--mode", "fwd,fwd+bwd", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_sweep_writes_table_csv_json_and_plot(sweep):
    out, result = sweep
    for header in ("backend", "median ms", "TF/s", "kernel", "check", "status"):
        assert header in result.output
    assert "softmax" in result.output and "glga" in result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 * 2  # backends x tokens x drops x modes
    assert {(r["backend"], r["tokens"], r["drop"], r["mode"]) for r in rows} == {
        (b, n, d, m)
        for b in ("softmax", "glga")
        for n in ("84", "120")  # 64 -> 3x4x7, 128 -> 3x5x8
        for d in ("0.0", "0.5")
        for m in ("fwd", "fwd+bwd")
    }
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_records_environment_parameters_and_every_cell(sweep):
    out, _ = sweep
    document = json.loads((out / "results.json").read_text())
    env = document["environment"]
    for key in ("device_name", "torch", "cuda", "date", "command", "eflow"):
        assert key in env
    assert env["dtype"] == "float32" and env["command"].startswith("eflow ")
    params = document["parameters"]
    assert params["backends"] == ["softmax", "glga"] and params["grids"] == ["3x4x7", "3x5x8"]
    assert params["heads"] == 2 and params["head_dim"] == 8 and params["repeats"] == 2
    records = document["results"]
    assert len(records) == 16
    for r in records:
        assert r["status"] == "ok", r
        assert r["dtype"] == "fp32" and r["device"] == "cpu"
        assert r["kept"] == round((1 - r["drop"]) * r["tokens"])  # sprint keeps half of every group here
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["first_call_ms"] is not None
        assert r["kernel"]
        assert r["check_against"] == "reference" and r["check"] < 1e-4  # fp32 attend vs the float64 reference
        assert r["peak_gb"] is None  # CPU: no allocator statistics


def test_softmax_flops_are_4_m2_d_per_head_and_3_5x_with_backward(sweep):
    out, _ = sweep
    records = json.loads((out / "results.json").read_text())["results"]
    for r in (r for r in records if r["backend"] == "softmax"):
        forward = 4.0 * 1 * 2 * r["kept"] ** 2 * 8
        expected = forward * (BACKWARD_FLOPS_FACTOR if r["mode"] == "fwd+bwd" else 1.0)
        assert r["flops"] == pytest.approx(expected)
        assert r["tflops"] == pytest.approx(expected / (r["median_ms"] * 1e-3) / 1e12)
        assert r["kernel"].startswith("SDPA")
    glga = [r for r in records if r["backend"] == "glga"]
    assert all(r["flops"] > 0 and "einsum" in r["kernel"] for r in glga)


def test_plot_command_redraws_from_results_json(sweep, tmp_path):
    out, _ = sweep
    (out / "attention.png").unlink()
    result = run("bench", "plot", out)
    assert result.exit_code == 0, result.output
    assert (out / "attention.png").is_file()
    target = tmp_path / "again.png"
    result = run("bench", "plot", out / "results.json", "--out", target)
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"\x89PNG"
    folder = tmp_path / "plots"
    folder.mkdir()
    result = run("bench", "plot", out, "--out", folder)  # a directory: the plot is written inside it
    assert result.exit_code == 0, result.output
    assert (folder / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert str(folder / "attention.png") in result.output


def test_plot_command_without_results_is_a_clean_error(tmp_path):
    assert_clean_error(run("bench", "plot", tmp_path), "no results.json")


# ----- more sweeps --------------------------------------------------------------------------------------
def test_attn_defaults_to_every_registered_backend(tmp_path):
    args = ["--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-check", "--no-plot"]
    result = run("bench", "attention", *args, *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["backend"] for r in records] == get_registry("attention").names()
    assert all(r["check_against"] == "off" for r in records)


def test_failing_cells_are_recorded_and_the_sweep_goes_on(tmp_path, test_backends):
    args = ["--attn", "broken-test,softmax,oom-test", "--tokens", "64", "--drop", "0,0.5", "--no-plot"]
    result = run("bench", "attention", *args, *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(records) == 3 * 2 * 2
    by_backend = {
        name: [r for r in records if r["backend"] == name] for name in ("broken-test", "softmax", "oom-test")
    }
    assert all(r["status"] == "error: RuntimeError: deliberately broken" for r in by_backend["broken-test"])
    assert all(r["check_against"].startswith("error") for r in by_backend["broken-test"])
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in by_backend["softmax"])
    assert all(r["status"] == "oom" and r["median_ms"] is None for r in by_backend["oom-test"])
    assert "deliberately broken" in result.output


def test_a_backend_refusing_fp32_is_checked_in_the_sweeps_dtype_and_says_so(tmp_path, test_backends):
    args = ["--attn", "half-only-test", "--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-plot"]
    result = run("bench", "attention", *args, *TINY, "--dtype", "bf16", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert record["status"] == "ok"
    assert record["check_against"] == "reference (in bfloat16: the backend refused fp32)"
    assert 0 < record["check"] < 3e-2  # bf16 rounding against the fp64 truth
    result = run(
        "bench", "attention", *args, *TINY, "--dtype", "fp32", "--out", tmp_path
    )  # nothing to fall to
    (record,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert record["check"] is None and "fp32 refused" in record["check_against"]


def test_layer_scope_adds_projection_flops_and_times_a_backends_own_ffn(tmp_path, test_backends):
    args = ["--attn", "softmax,own-ffn-test", "--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-plot"]
    result = run("bench", "attention", *args, "--scope", "layer", *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    softmax, own = json.loads((tmp_path / "results.json").read_text())["results"]
    assert softmax["scope"] == "layer" and softmax["status"] == "ok"
    m, dim = softmax["kept"], 2 * 8
    assert softmax["flops"] == pytest.approx(4.0 * 2 * m * m * 8 + 8.0 * m * dim**2)
    assert own["status"] == "ok" and own["flops"] is None and own["tflops"] is None
    assert "TokenMixer" in own["note"] and "TokenMixer" in result.output


def test_backend_options_through_set(tmp_path):
    args = ["--attn", "glga", "--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-plot", "--no-check"]
    result = run("bench", "attention", *args, "--set", "glga.branches=window", *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert record["options"]["branches"] == "window" and "einsum" not in record["kernel"]


def test_variants_of_one_backend_run_side_by_side_under_their_own_labels(tmp_path):
    """--attn LABEL=BACKEND: the same backend twice in one sweep, each with its own --set options; the
    records carry the labels, their options and a note naming the registered backend."""
    args = ["--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-plot"]
    attn = "softmax,softmax-math=softmax,glga,glga-window=glga"
    sets = ["--set", "softmax-math.kernel=math", "--set", "glga-window.branches=window"]
    result = run("bench", "attention", "--attn", attn, *sets, *args, *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = {r["backend"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert list(records) == ["softmax", "softmax-math", "glga", "glga-window"]
    assert all(r["status"] == "ok" and r["check"] < 1e-5 for r in records.values())
    assert records["softmax"]["options"] == {"kernel": "auto"} and records["softmax"]["note"] == ""
    assert records["softmax-math"]["options"] == {"kernel": "math"}
    assert records["softmax-math"]["kernel"] == "SDPA math (the kernel option)"
    assert records["softmax-math"]["note"] == "softmax-math = softmax with kernel='math'"
    assert records["glga"]["options"]["branches"] == "gated"
    assert records["glga-window"]["options"]["branches"] == "window"
    assert "einsum" in records["glga"]["kernel"] and "einsum" not in records["glga-window"]["kernel"]


def test_without_matplotlib_csv_and_json_are_written_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr("eflow.bench.plot.matplotlib_available", lambda: False)
    args = ["--attn", "softmax", "--tokens", "64", "--drop", "0", "--mode", "fwd", "--no-check"]
    result = run("bench", "attention", *args, *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.output
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.json").is_file()
    assert not (tmp_path / "attention.png").exists()


# ----- sizes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "tokens"),
    [("8k", 8000), ("32k", 32000), ("125000", 125000), ("1.5K", 1500), ("125_000", 125000)],
)
def test_token_counts_parse(text, tokens):
    assert parse_token_count(text) == tokens


@pytest.mark.parametrize(
    ("tokens", "grid"),
    [
        (8000, (5, 30, 52)),
        (32000, (21, 30, 52)),
        (125000, (80, 30, 52)),
        (256, (4, 6, 10)),
        (512, (5, 8, 13)),
    ],
)
def test_token_counts_map_to_480p_frames(tokens, grid):
    assert grid_for_tokens(tokens) == grid


def test_video_sizes_and_explicit_grids():
    assert sweep_grids(None, "21", "480p", None) == [(21, 30, 52)]  # 81 frames of 480x832: 32,760 tokens
    assert sweep_grids(None, None, "480p", None) == [(21, 30, 52)]
    assert sweep_grids(None, "5,21", None, None) == [(5, 30, 52), (21, 30, 52)]
    assert sweep_grids(None, "21", "720p", None) == [(21, 45, 80)]
    assert sweep_grids(None, None, None, "21x30x52,2x4x4") == [(21, 30, 52), (2, 4, 4)]
    assert sweep_grids(None, None, None, None) == [(5, 30, 52), (21, 30, 52), (80, 30, 52)]  # 8k,32k,125k
    with pytest.raises(ConfigError, match="multiples of 16"):
        sweep_grids(None, None, "480x830", None)


def test_out_of_memory_is_recognised_also_when_wrapped():
    assert failure_status(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert failure_status(RuntimeError("backend compiler failed: CUDA out of memory")) == "oom"
    assert failure_status(ValueError("bad shape")) == "error: ValueError: bad shape"


# ----- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--attn", "softmax,nope"], ["unknown attention 'nope'; choices:", "glga", "softmax"]),
        (["--tokens", "lots"], ["--tokens 'lots'", "8k"]),
        (["--mode", "fwd,bwd"], ["--mode 'bwd'", "fwd+bwd"]),
        (["--drop", "1.0"], ["--drop 1", "[0, 1)"]),
        (["--tokens", "8k", "--grid", "1x2x2"], ["--tokens or --grid"]),
        (["--grid", "21x30"], ["T'xH'xW'"]),
        (["--size", "480x830"], ["multiples of 16"]),
        (["--scope", "block"], ["--scope 'block'", "attend, layer"]),
        (["--dtype", "fp8"], ["--dtype 'fp8'", "bf16"]),
        (["--set", "glga.nope=1"], ["glga", "nope: unknown field; valid fields: window_frames"]),
        (
            ["--set", "softmax.window=1", "--attn", "glga"],
            ["'softmax' is not among the benchmarked backends"],
        ),
        (["--set", "window_frames=1"], ["BACKEND.FIELD=VALUE"]),
        (["--attn", "softmax,softmax"], ["softmax named twice", "softmax-flash=softmax"]),
        (["--attn", "glga=softmax"], ["'glga' is a registered backend", "softmax-2=softmax"]),
        (["--attn", "mine=nope"], ["unknown attention 'nope'; choices:"]),
        (["--attn", "=softmax"], ["--attn '=softmax'", "LABEL=BACKEND"]),
        (["--attn", "softmax=softmax"], ["the backend's own name", "softmax-2=softmax"]),
        (["--attn", "glga.x=glga"], ["holds a '.'", "glga-2=glga"]),
        (["--attn", "mine=softmax", "--set", "mine.kernel=fa3"], ["mine", "kernel: Input should be 'auto'"]),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args, fragments, tmp_path):
    assert_clean_error(run("bench", "attention", *args, "--device", "cpu", "--out", tmp_path), *fragments)
    assert not (tmp_path / "results.json").exists()
