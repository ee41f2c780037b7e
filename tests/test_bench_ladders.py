"""`eflow bench train` and `eflow bench sample` (EFlow Fig. 4a / 4b ladders) on the CPU at tiny sizes."""

import csv
import json

import pytest
import torch
from conftest import assert_clean_error
from conftest import run_cli as run
from torch.utils.flop_counter import FlopCounterMode

from eflow.bench import sample_ladder, train_ladder
from eflow.bench.device_peak import mfu, peak_tflops
from eflow.bench.ladder import base_config, parse_rungs
from eflow.bench.model_flops import BACKWARD_FACTOR, forward_flops
from eflow.bench.tables import results_view
from eflow.bench.train_ladder import DEFAULT_RUNG, RUNG_KEYS, TRAIN_RUNGS, TrainLadderSpec
from eflow.condition import Condition
from eflow.model.dit import build_model
from eflow.registry import get_registry

# tiny preset (patch 1x4x4, pixel latents): 2 frames of 16x16 pixels = a 2x4x4 grid of 32 tokens
CLIP = ["--preset", "tiny", "--frames", "2", "--size", "16", "--device", "cpu"]
TRAIN = ["bench", "train", *CLIP, "--batch-size", "2", "--steps", "2", "--warmup", "1"]
SAMPLE = ["bench", "sample", *CLIP, "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids stalls (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ladder_run(tmp_path_factory, name, command):
    """(out, the CLI result, results.json) of `command` run into a fresh folder `name`."""
    out = tmp_path_factory.mktemp("ladders") / name
    result = run(*command, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    return ladder_run(tmp_path_factory, "train", TRAIN)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    return ladder_run(tmp_path_factory, "sample", SAMPLE)


# ----- eflow bench train -----------------------------------------------------------------------------
def test_train_ladder_measures_every_rung_and_writes_table_csv_json_and_plot(train_run):
    out, result, document = train_run
    names = ["fm-softmax", "sfm", "sfm-mva", "+glga", "+pdg", "+drop"]
    records = document["results"]
    assert [r["rung"] for r in records] == names
    for r in records:
        assert r["status"] == "ok", r
        assert r["it_s"] > 0 and r["samples_s"] == pytest.approx(2 * r["it_s"])
        assert r["flops"] > 0 and r["tflops"] > 0
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["first_step_s"] > 0
        assert r["mfu"] is None and r["peak_gb"] is None  # CPU: no peak table entry, no allocator stats
        assert (r["grid"], r["tokens"], r["batch"], r["dtype"]) == ("2x4x4", 32, 2, "fp32")
    assert records[0]["speedup"] == 1.0
    assert all(r["speedup"] == pytest.approx(r["it_s"] / records[0]["it_s"]) for r in records)
    for header in ("rung", "it/s", "samples/s", "MFU", "passes", "speed-up", "status", *names):
        assert header in result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rung"] for row in rows] == names
    for field in ("it_s", "samples_s", "warmup_s", "flops", "mfu", "passes", "peak_gb", "speedup", "kept"):
        assert field in rows[0]
    assert json.loads(rows[0]["passes"])["full_grad"] == 1.0
    assert document["benchmark"] == "train-ladder"
    assert document["environment"]["command"].startswith("eflow ")
    params = document["parameters"]
    assert (params["preset"], params["grid"], params["clip"], params["batch"]) == (
        "tiny",
        "2x4x4",
        "2x16x16",
        2,
    )
    assert [rung["name"] for rung in params["rungs"]] == names
    assert (out / "train_ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_rungs_add_the_papers_steps_one_at_a_time(train_run):
    records = {r["rung"]: r for r in train_run[2]["results"]}
    setting = {
        name: (r["attention"], r["objective"], r["mva_share"] > 0, r["drop"]) for name, r in records.items()
    }
    assert setting == {
        "fm-softmax": ("softmax", "fm", False, 0.0),
        "sfm": ("softmax", "sfm", False, 0.0),
        "sfm-mva": ("softmax", "sfm", True, 0.0),
        "+glga": ("glga", "sfm", True, 0.0),
        "+pdg": ("glga", "pdg-sfm", True, 0.0),
        "+drop": ("glga", "pdg-sfm", True, 0.75),
    }
    passes = {name: r["passes"] for name, r in records.items()}
    assert passes["fm-softmax"] == {
        "full_grad": 1.0,
        "full_nograd": 0.0,
        "weak_grad": 0.0,
        "weak_nograd": 0.0,
    }
    for name in ("sfm", "sfm-mva", "+glga"):  # the unconditional velocity from a full no-grad pass
        assert (
            passes[name]["full_nograd"] > 0 and passes[name]["weak_grad"] + passes[name]["weak_nograd"] == 0
        )
    for name in ("+pdg", "+drop"):  # PDG: from the weak path
        assert passes[name]["weak_grad"] + passes[name]["weak_nograd"] > 0
    assert (
        records["+drop"]["kept"] == 8 and records["+pdg"]["kept"] == 32
    )  # sprint keeps 2 of each 2x2x2 group
    assert records["+drop"]["flops"] < records["+pdg"]["flops"]


def test_train_flops_count_forward_once_and_gradient_passes_three_times(train_run):
    fm = train_run[2]["results"][0]  # fm: one full pass with gradient per sample
    model = build_model("tiny", attention="softmax", in_channels=3, num_classes=8)
    forward = forward_flops(model, (2, 4, 4)).total
    assert fm["flops"] == pytest.approx(BACKWARD_FACTOR * 2 * forward)


def test_dense_flops_match_torchs_flop_counter_on_every_path():
    """Linears and the patch convolution, counted analytically, equal what FlopCounterMode sees (CPU SDPA
    is invisible to it, so attention is compared separately: softmax = 4 M^2 D per block)."""
    torch.manual_seed(0)
    grid = (2, 4, 4)
    keep = get_registry("token_drop").create("sprint").select(grid, 2, 0.75, torch.Generator().manual_seed(0))
    x, t = torch.randn(2, 3, 2, 16, 16), torch.rand(2)
    cases = [
        (build_model("tiny", attention="softmax"), Condition(labels=torch.tensor([1, 2])), 0),
        (build_model("tiny", attention="softmax", text_dim=16), Condition(text=torch.randn(2, 5, 16)), 5),
    ]
    for model, cond, text in cases:
        for path, kept in (("full", None), ("full", keep), ("weak", None)):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x, t, t, cond, torch.zeros(2), path=path, keep=kept)
            flops = forward_flops(model, grid, None if kept is None else kept[:1], path, text)
            assert 2 * flops.dense == counter.get_total_flops(), (path, kept is not None, text)
            m = 8 if kept is not None else 32
            blocks = [(1 + 1, 32)] + ([(4, m)] if path == "full" else [])  # encoder + decoder, middle
            self_attention = sum(n * 4 * tokens**2 * 96 for n, tokens in blocks)
            cross = sum(n * 4 * tokens * (text + 1) * 96 for n, tokens in blocks) if text else 0
            assert flops.attention == self_attention + cross


def test_a_custom_rung_starts_from_a_named_one_and_changes_its_fields(tmp_path):
    custom = "name=mine,base=+pdg,attn=softmax,drop=0.5"
    result = run(
        *TRAIN, "--steps", "1", "--warmup", "0", "--rung", "fm-softmax", "--rung", custom, "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["rung"] for r in records] == ["fm-softmax", "mine"]
    mine = records[1]
    assert (mine["attention"], mine["objective"], mine["drop"], mine["status"]) == (
        "softmax",
        "pdg-sfm",
        0.5,
        "ok",
    )
    assert mine["mva_share"] == 0.25 and mine["kept"] < mine["tokens"]


def test_an_out_of_memory_rung_is_recorded_and_the_ladder_goes_on(tmp_path, monkeypatch):
    real_step = train_ladder.train_step

    def step(state):
        if state.rung.name == "sfm":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        real_step(state)

    monkeypatch.setattr(train_ladder, "train_step", step)
    args = [
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rung",
        "fm-softmax,sfm,sfm-mva",
        "--out",
        tmp_path,
        "--no-plot",
    ]
    result = run(*TRAIN, *args)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in records] == ["ok", "oom", "ok"]
    assert records[1]["it_s"] is None and records[1]["speedup"] is None
    assert records[2]["it_s"] > 0 and records[2]["speedup"] > 0


def test_compile_and_checkpointing_apply_to_the_rungs_as_in_eflow_train(tmp_path):
    """--compile compiles every block of the online model and the EMA (Dynamo compiles graphs during
    the warm-up), --ac full checkpoints the online blocks; both are recorded per rung and in the start
    line. FSDP and sequence parallelism need torchrun: refused, naming what applies."""
    torch._dynamo.reset()  # forget compiled code: every graph the ladder needs is compiled anew
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = run(
        *TRAIN, "--rung", "fm-softmax,+pdg", "--compile", "--ac", "full", "--out", tmp_path, "--no-plot"
    )
    assert result.exit_code == 0, result.output
    assert "ac full, compiled blocks" in " ".join(result.output.split())
    document = json.loads((tmp_path / "results.json").read_text())
    assert (document["parameters"]["ac"], document["parameters"]["compile"]) == ("full", True)
    records = document["results"]
    assert [(r["status"], r["ac"], r["compiled"]) for r in records] == [("ok", "full", True)] * 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    refused = run(*TRAIN, "--set", "parallel.fsdp=true", "--out", tmp_path / "refused")
    assert_clean_error(refused, "runs one process", "--ac and --compile apply here")


@pytest.mark.parametrize("command", [TRAIN, SAMPLE])
def test_an_unknown_rung_is_one_error_listing_the_choices(command, tmp_path):
    result = run(*command, "--rung", "nope", "--out", tmp_path)
    choices = "fm-softmax, sfm, sfm-mva" if command is TRAIN else "fm-softmax-40x2, solution-softmax-4"
    assert_clean_error(result, "unknown rung 'nope'", choices)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--size", "18"], ["height=18 is not divisible by the patch size 4"]),
        (["--rung", "name=x,atn=glga"], ["unknown key 'atn'", "attn"]),
        (["--rung", "name=x,mva=3"], ["mva=3", "true or false"]),
        (["--rung", "name=x,objective=fm,mva=true"], ["objective 'fm' has no MVA"]),
        (["--rung", "name=x,attn=nope"], ["rung 'x'", "unknown attention 'nope'", "softmax"]),
        (["--rung", "sfm,sfm"], ["sfm given twice"]),
        (["--grid", "2x4x4"], ["give the clip one way"]),
        (["--dtype", "fp16"], ["--dtype 'fp16'", "bf16, fp32"]),
        (  # options for a plugin a rung switches to would be dropped there: refused on the base
            ["--set", "model.attention_options={reference_frames=1}"],
            ["the base config", "reference_frames", "--set model.attention=tile"],
        ),
    ],
)
def test_bad_input_is_one_clear_error(args, fragments, tmp_path):
    assert_clean_error(run(*TRAIN, *args, "--out", tmp_path), *fragments)


def test_rungs_parse_from_names_and_key_value_pairs():
    assert parse_rungs(None, TRAIN_RUNGS, RUNG_KEYS, DEFAULT_RUNG) == list(TRAIN_RUNGS.values())
    rungs = parse_rungs(
        ["fm-softmax, +drop", "name=half,base=+drop,drop=0.5,mva=false"], TRAIN_RUNGS, RUNG_KEYS, DEFAULT_RUNG
    )
    assert [r.name for r in rungs] == ["fm-softmax", "+drop", "half"]
    assert (rungs[2].attention, rungs[2].objective, rungs[2].drop, rungs[2].mva) == (
        "glga",
        "pdg-sfm",
        0.5,
        False,
    )
    plain = parse_rungs(["attn=glga,drop=1"], TRAIN_RUNGS, RUNG_KEYS, DEFAULT_RUNG)[0]
    assert (plain.name, plain.attention, plain.objective, plain.drop) == ("custom-1", "glga", "fm", 1.0)


def test_a_token_grid_gives_the_clip_that_the_autoencoder_and_patch_map_onto_it():
    base = base_config([{"model": {"preset": "tiny"}}], grid=(3, 2, 5))
    assert (base.data.frames, base.data.height, base.data.width) == (3, 8, 20)  # pixels, patch 1x4x4
    spec = TrainLadderSpec(base=base, rungs=[TRAIN_RUNGS["fm-softmax"]])
    assert spec.layout() == ((3, 2, 5), (3, 3, 8, 20))


def test_peak_throughput_is_known_for_common_gpus_and_none_elsewhere():
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert peak_tflops("NVIDIA H200", torch.bfloat16) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312.0
    assert peak_tflops("NVIDIA H200", torch.float32) is None
    assert peak_tflops("cpu", torch.bfloat16) is None
    assert mfu(989e12, 2.0, 989.0) == pytest.approx(0.5) and mfu(1e12, 1.0, None) is None


def test_bench_plot_redraws_a_ladder_plot(train_run, tmp_path):
    target = tmp_path / "again.png"
    result = run("bench", "plot", train_run[0], "--out", target)
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- eflow bench sample ----------------------------------------------------------------------------
def test_sample_ladder_counts_nfe_and_reports_diffusion_and_end_to_end_latency(sample_run):
    out, result, document = sample_run
    records = document["results"]
    assert [(r["rung"], r["sampler"], r["attention"], r["steps"], r["nfe"]) for r in records] == [
        ("fm-softmax-40x2", "euler", "softmax", 40, 80),  # CFG: 2 evaluations per step
        ("solution-softmax-4", "solution", "softmax", 4, 4),
        ("solution-glga-4", "solution", "glga", 4, 4),
        ("solution-glga-1", "solution", "glga", 1, 1),
    ]
    for r in records:
        assert r["status"] == "ok", r
        assert r["batch"] == 1 and r["diffusion_s"] > 0 and r["decode_s"] is not None
        assert r["e2e_s"] == pytest.approx(r["diffusion_s"] + r["decode_s"])
        assert r["flops"] > 0 and r["speedup"] == pytest.approx(records[0]["diffusion_s"] / r["diffusion_s"])
    assert records[0]["speedup"] == 1.0 and records[0]["e2e_speedup"] == 1.0
    assert records[3]["flops"] == pytest.approx(records[2]["flops"] / 4)  # same model, 1 NFE instead of 4
    for header in ("NFE", "diffusion s", "decode s", "e2e s", "speed-up", "fm-softmax-40x2"):
        assert header in result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["nfe"]) for row in rows] == [80, 4, 4, 1]
    assert document["benchmark"] == "sample-ladder" and document["parameters"]["batch"] == 1
    assert document["environment"]["command"].startswith("eflow ")
    assert (out / "sample_ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_custom_sample_rung_and_an_out_of_memory_rung(tmp_path, monkeypatch):
    real_measure = sample_ladder.measure

    def measure(cfg, spec, device, record, peak):
        if record.rung == "solution-softmax-4":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        real_measure(cfg, spec, device, record, peak)

    monkeypatch.setattr(sample_ladder, "measure", measure)
    rungs = [
        "--rung",
        "solution-softmax-4,solution-glga-1",
        "--rung",
        "name=glga-2,base=solution-glga-4,steps=2",
    ]
    result = run(*SAMPLE, "--repeats", "1", "--warmup", "0", *rungs, "--out", tmp_path, "--no-plot")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["rung"], r["status"], r["nfe"]) for r in records] == [
        ("solution-softmax-4", "oom", None),
        ("solution-glga-1", "ok", 1),
        ("glga-2", "ok", 2),
    ]
    assert records[1]["speedup"] is None  # no baseline: the first rung failed


# ----- what the ladders share, and the bench CLI's helpers ---------------------------------------------
def test_ladder_parameters_keep_their_order_and_the_view_repeats_the_printed_table(train_run, sample_run):
    shared = ["preset", "grid", "tokens", "clip", "latent_shape", "autoencoder", "condition", "batch"]
    tail = ["warmup", "device", "dtype", "seed", "rungs"]
    assert list(train_run[2]["parameters"]) == [*shared, "steps", "warmup", "ac", "compile", *tail[1:]]
    assert list(sample_run[2]["parameters"]) == [*shared, "repeats", *tail]
    table, notes = results_view(train_run[2])
    assert table.title.startswith("training ladder on ") and "2x4x4 tokens, batch 2, fp32" in table.title
    assert [column.header for column in table.columns][:3] == ["rung", "attn", "objective"]
    assert len(notes) == 1 and notes[0].startswith("passes = forward passes")
    table, notes = results_view(sample_run[2])
    assert table.columns[-1].header == "status" and len(table.rows) == 4
    assert notes == ["the pixel autoencoder decodes for free; e2e = diffusion (see --random-vae)"]


def test_random_vae_and_a_vae_path_are_one_clear_error(tmp_path):
    result = run(*SAMPLE, "--random-vae", "--vae-path", tmp_path, "--out", tmp_path)
    assert_clean_error(result, "--random-vae and --vae-path contradict each other")


@pytest.mark.parametrize("pair", ["window_frames=1", "glga.window_frames", ".x=1", "glga.=1"])
def test_a_bench_attention_set_pair_without_backend_and_field_names_the_form(pair, tmp_path):
    result = run("bench", "attention", "--set", pair, "--device", "cpu", "--out", tmp_path)
    assert_clean_error(
        result, f"--set {pair!r}: expected BACKEND.FIELD=VALUE, e.g. --set glga.window_frames=6"
    )
