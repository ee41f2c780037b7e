"""`eflow repro`: the paper's rows, a tiny table end to end, skipping, resuming, row selection, extra rows."""

import functools
import json
import shlex
import shutil

import pytest
from conftest import assert_clean_error, ok, run_cli

from eflow.errors import ConfigError
from eflow.repro.rows import extra_row, parse_row_flags, table_rows
from eflow.repro.runner import ReproSpec, plan, trained_step
from eflow.repro.tables import ALL, TABLES, claim_holds

# one torch thread: train and eval run in this process
pytestmark = pytest.mark.usefixtures("one_thread_per_module")
TINY = ["--preset", "tiny", "--frames", "2", "--size", "8", "--batch-size", "2", "--device", "cpu"]
EVAL = ["--eval-num", "8", "--eval-batch-size", "8"]
run = functools.partial(run_cli, columns=250)  # wide: tables unwrapped
assert_clean_error = functools.partial(assert_clean_error, unwrap=True)


def tiny_spec(table, out, **kw):
    scale = {"preset": "tiny", "frames": 2, "size": "8", "batch_size": 2, "device": "cpu", "steps": 2}
    return ReproSpec(table=table, out=str(out), **{**scale, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A small in-domain classifier for shapes 2x8x8 (repro would train a full-size one on first use)."""
    cache = tmp_path_factory.mktemp("cache")
    ok(
        run(
            "eval", "train-extractor", "--data", "shapes", "--frames", 2, "--size", 8, "--train-clips", 160,
            "--heldout-clips", 40, "--epochs", 1, "--net-width", 8, "--device", "cpu", "--cache-dir", cache,
        )
    )  # fmt: skip
    return cache


@pytest.fixture(scope="module")
def table3(tmp_path_factory, cache):
    """table3 at tiny size: the gated row and an extra row (softmax attention), 2 steps each."""
    out = tmp_path_factory.mktemp("repro")
    args = ["repro", "table3", "--rows", "gated,mine", "--extra-row", "mine=--attn softmax --nfe 2"]
    result = ok(run(*args, *TINY, "--steps", 2, *EVAL, "--cache-dir", cache, "--out", out))
    return out, args, result


# ----- the rows ----------------------------------------------------------------------------------------------
def test_every_row_builds_the_paper_configuration(tmp_path):
    plans = plan(tiny_spec(ALL, tmp_path))
    expect = {  # row: (attention, branches, objective, mva, dropping, NFE), from the paper's tables
        "base1": ("softmax", None, "fm", False, False, 40),
        "base2": ("sana", None, "fm", False, False, 40),
        "base3": ("sana", None, "fm", False, True, 40),
        "ours1": ("glga", None, "fm", False, False, 40),
        "ours2": ("glga", None, "fm", False, True, 40),
        "ours3": ("glga", None, "pdg-sfm", False, True, 4),
        "ours4": ("glga", None, "pdg-sfm", True, True, 4),
        "linear": ("glga", "linear", "fm", False, True, 50),
        "window": ("glga", "window", "fm", False, True, 50),
        "sum": ("glga", "sum", "fm", False, True, 50),
        "gated": ("glga", "gated", "fm", False, True, 50),
        "fm-50": ("glga", None, "fm", False, True, 50),
        "fm-4": ("glga", None, "fm", False, True, 4),
        "sfm-4": ("glga", None, "sfm", False, True, 4),
        "pdg-sfm-4": ("glga", None, "pdg-sfm", False, True, 4),
    }
    seen = {}
    for name, table_plans in plans.items():
        assert [p.row.name for p in table_plans] == [r.name for r in TABLES[name].rows]
        for p in table_plans:
            cfg = p.cfg
            attn, branches, objective, mva, dropping, nfe = expect[p.row.name]
            assert cfg.model.attention == attn and cfg.model.preset == "tiny"
            if branches:
                assert cfg.model.attention_options["branches"] == branches
            assert cfg.objective.name == objective
            assert bool(cfg.objective.options.get("mva", False)) is mva
            stages = [(s.start, s.end, s.drop_ratio) for s in cfg.schedule.stages]
            if dropping:  # Sec. 5.1 / App. C.1: 75% for the first 80% of the steps, SPRINT, then dense
                assert cfg.token_drop.name == "sprint" and stages == [(0.0, 0.8, 0.75), (0.8, 1.0, 0.0)]
            else:
                assert cfg.token_drop.name == "none" and stages == [(0.0, 1.0, 0.0)]
            assert p.row.nfe == nfe and cfg.sample.steps == nfe  # `eflow sample RUN` samples as the row
            assert p.row.paper_fvd is not None and p.row.source
            seen[p.row.name] = p
    assert set(seen) == set(expect)
    assert plans["table2"][0].cfg.train.steps == 2 and plans["table3"][0].cfg.data.frames == 2


def test_the_paper_numbers_satisfy_every_claim():
    for table in TABLES.values():
        fvd = {r.name: r.paper_fvd for r in table.rows}
        for claim in table.claims:
            assert set(claim.rows()) <= set(fvd), claim
            assert claim_holds(claim, fvd) is True, claim
        assert claim_holds(table.claims[0], {}) is None  # a missing row: no verdict


def test_tables_default_to_the_papers_model_and_table4_samples_one_fm_run_twice(tmp_path):
    plans = plan(ReproSpec(table=ALL, out=str(tmp_path), device="cpu"))
    assert {name: ps[0].cfg.model.preset for name, ps in plans.items()} == {
        "table2": "XL",
        "table3": "B",
        "table4": "B",
    }
    fm50, fm4 = plans["table4"][0], plans["table4"][1]
    assert fm50.run_dir == fm4.run_dir == tmp_path / "table4" / "fm"
    assert (fm50.eval_path.name, fm4.eval_path.name) == ("eval.json", "eval_fm-4.json")


def test_match_compute_gives_every_row_the_first_rows_flops(tmp_path):
    plans = plan(tiny_spec("table2", tmp_path, steps=100, match="compute"))["table2"]
    base1 = plans[0]
    assert base1.steps == 100 and base1.run_dir.parent.name == "table2-compute"
    budget = 100 * base1.predicted_flops
    for p in plans[1:]:
        if p.cfg.model.attention == "sana":  # Mix-FFN: FLOPs unknown to the counter
            assert p.predicted_flops is None and p.steps == 100 and "unknown" in p.steps_rule
            continue
        assert p.steps == round(budget / p.predicted_flops)
        assert abs(p.steps * p.predicted_flops - budget) <= p.predicted_flops / 2 + 1


# ----- extra rows and row flags ---------------------------------------------------------------------------
def test_an_extra_row_is_the_base_row_plus_its_flags_and_drops_options_of_a_replaced_plugin():
    mine = extra_row("mine=--attn softmax --nfe 8", TABLES["table3"])
    assert mine.nfe == 8 and "branches" not in mine.flags and "--attn softmax" in mine.flags
    assert "--objective fm" in mine.flags and "--drop-ratio 0.75" in mine.flags  # the rest of (d)
    fm = extra_row("fm=--objective fm", TABLES["table2"])  # base ours4 has --mva: not for fm
    assert "--mva" not in fm.flags and fm.nfe == 4
    kept = extra_row("w2=--set model.attention_options.window_frames=1", TABLES["table3"])
    assert "branches=gated" in kept.flags and "window_frames=1" in kept.flags
    flags = parse_row_flags("--attn=glga --no-mva --size 16x32 --drop-ratio 0.5 --set a.b=1", "test")
    assert flags.flags == {"attn": "glga", "mva": False, "size": "16x32", "drop_ratio": 0.5}
    assert flags.sets == ["a.b=1"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("mine", "expected NAME=FLAGS"),
        ("gated=--attn softmax", "already has a row"),
        ("fm=--attn softmax", "already has a row"),
        ("a/b=--attn softmax", "names a directory"),
        ("mine=--bogus 1", "unknown flag --bogus; flags: --ac, --attn"),
        ("mine=--out x", "unknown flag --out"),
        ("mine=--nfe 0", "--nfe must be at least 1"),
        ("mine=--attn", "--attn needs a value"),
    ],
)
def test_a_bad_extra_row_is_one_clear_error(text, fragment):
    table = TABLES["table4"] if text.startswith("fm=") else TABLES["table3"]
    with pytest.raises(ConfigError, match=None) as info:
        table_rows(table, [text])
    assert fragment in str(info.value)


def test_unknown_table_row_or_plugin_errors_list_the_choices(tmp_path):
    assert_clean_error(
        run("repro", "table9", "--list"), "unknown table 'table9'", "table2, table3, table4, all"
    )
    assert_clean_error(
        run("repro", "table3", "--rows", "gated,nope", "--list"),
        "unknown row(s) 'nope'",
        "choices: linear, window, sum, gated",
    )
    assert_clean_error(
        run("repro", "table3", "--extra-row", "x=--attn nope", *TINY, "--list"),
        "row x: unknown attention 'nope'",
        "softmax",
    )
    assert_clean_error(run("repro", "table3", "--match", "flops", "--list"), "--match 'flops'")
    assert_clean_error(
        run("repro", "table3", *TINY, "--set", "train.out=elsewhere", "--list"),
        "train.out is chosen by eflow repro",
    )


def test_list_prints_each_rows_train_command(tmp_path):
    result = ok(run("repro", "table4", "--list", *TINY, "--steps", 3, "--out", tmp_path))
    text = " ".join(result.output.split())
    assert "eflow train --preset tiny" in text and "--objective sfm --no-mva" in text
    assert f"--out {tmp_path / 'table4' / 'fm'}" in text and "paper FVD 513.8" in text
    picked = ok(run("repro", "all", "--list", *TINY, "--rows", "fm-4,ours1", "--out", tmp_path)).output
    assert "fm-4 (FM" in picked and "ours1 (Ours1" in picked, picked
    assert "sfm-4" not in picked and "base1" not in picked and "Table 3" not in picked, picked


# ----- a tiny table, end to end ---------------------------------------------------------------------------
def test_a_tiny_table_trains_evaluates_and_writes_table_json_and_chart(table3):
    out, _, result = table3
    assert "Table 3: GLGA components" in result.output and "in-domain FVD" in result.output
    doc = json.loads((out / "table3" / "results.json").read_text())
    assert (out / "table3" / "table3.png").is_file()
    rows = {r["row"]: r for r in doc["rows"]}
    assert list(rows) == ["linear", "window", "sum", "gated", "mine"]
    assert {name: r["status"] for name, r in rows.items()} == {
        "linear": "not run",
        "window": "not run",
        "sum": "not run",
        "gated": "done",
        "mine": "done",
    }
    gated, mine = rows["gated"], rows["mine"]
    assert gated["paper"]["fvd"] == 325.7 and mine["paper"]["fvd"] is None
    assert gated["eval"]["metric_label"] == "in-domain FVD" and gated["eval"]["fvd"] >= 0
    assert gated["eval"]["steps"] == 50 and gated["eval"]["sampler"] == "euler" and mine["eval"]["steps"] == 2
    assert 0 <= gated["eval"]["accuracy"] <= 1 and gated["eval"]["n"] == 8
    s = gated["scale"]
    assert (s["steps"], s["trained_step"], s["clips_seen"], s["tokens_per_clip"]) == (2, 2, 4, 8)
    assert s["model_flops"] > 0 and s["train_seconds"] > 0 and s["gpu_seconds"] is None
    assert s["devices"] == ["cpu"] and s["params"] > 0 and s["middle_keep"] == 0.25
    assert mine["config"]["attention"] == "softmax"
    assert doc["paper"]["model"] == "B" and doc["ours"]["scale"]["preset"] == "tiny"
    assert all(c["paper"]["holds"] for c in doc["claims"])
    assert doc["claims"][0]["ours"]["holds"] is None  # sum (c) not run yet
    report = json.loads((out / "table3" / "gated" / "eval.json").read_text())  # an ordinary eval.json
    assert report["run"]["step"] == 2 and report["repro"]["row"] == "gated"


def test_a_row_directory_is_an_ordinary_run(table3):
    out, _, _ = table3
    result = ok(run("sample", out / "table3" / "gated", "--num", 2, "--device", "cpu", "--steps", 2))
    assert "Traceback" not in result.output


def test_rerunning_skips_finished_rows(table3, cache):
    out, args, _ = table3
    eval_json = out / "table3" / "gated" / "eval.json"
    before = eval_json.read_text()
    result = ok(run(*args, *TINY, "--steps", 2, *EVAL, "--cache-dir", cache, "--out", out))
    text = " ".join(result.output.split())
    assert "gated: trained (2 steps), skipped" in text and "gated: evaluated (eval.json), skipped" in text
    assert eval_json.read_text() == before
    # --parallel with nothing left to do starts no child
    result = ok(run(*args, *TINY, "--steps", 2, *EVAL, "--cache-dir", cache, "--out", out, "--parallel", 2))
    assert "gated: done, skipped" in " ".join(result.output.split())


def test_report_only_writes_the_table_from_copied_folders_without_weights(table3, cache, tmp_path):
    """Rows finished elsewhere, copied back without weights: the report is rebuilt, nothing is trained."""
    out, _, _ = table3
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "results.json"))
    rest = [*TINY, "--steps", 2, *EVAL, "--cache-dir", cache, "--out", copy]
    result = ok(run("repro", "table3", "--extra-row", "mine=--attn softmax --nfe 2", "--report-only", *rest))
    doc = json.loads((copy / "table3" / "results.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert rows["gated"]["status"] == "done" and rows["mine"]["status"] == "done", result.output
    assert rows["sum"]["status"] == "not run" and not (copy / "table3" / "sum").exists()  # nothing trained
    before = json.loads((out / "table3" / "results.json").read_text())
    assert rows["gated"]["eval"] == {r["row"]: r for r in before["rows"]}["gated"]["eval"]


def test_a_parallel_childs_command_line_runs_its_rows(table3, cache):
    out, _, _ = table3
    spec = tiny_spec("table3", out, extra_rows=["mine=--attn softmax --nfe 2"], eval_num=8, eval_batch_size=8)
    spec.cache_dir, spec.parallel = str(cache), 2
    argv = spec.child_argv("table3", ["gated"])
    assert argv[1:4] == ["-m", "eflow.cli.app", "repro"] and argv[-2:] == ["--worker", "2"]
    result = ok(run_cli(*argv[3:]))  # the child, in this process: nothing to do, no report
    assert "gated: evaluated (eval.json), skipped" in " ".join(result.output.split())
    assert "claims" not in result.output


def test_a_childs_environment_names_its_gpu_and_its_share_of_the_threads(tmp_path, monkeypatch):
    from eflow.repro.runner import child_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    spec = ReproSpec(table="table3", out=str(tmp_path), parallel=8, gpus=2)
    env = child_env(spec, 5)
    assert (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]) == ("1", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the caller's choice stands
    assert child_env(ReproSpec(table="table3", out=str(tmp_path), parallel=64), 0)["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert child_env(ReproSpec(table="table3", out=str(tmp_path), parallel=64), 0)["OMP_NUM_THREADS"] == "1"


def test_an_interrupted_row_resumes_and_the_counted_flops_match_the_prediction(tmp_path, cache):
    from eflow.repro.accounting import CountingTrainer

    spec = tiny_spec("table2", tmp_path, rows=["base1"])
    p = plan(spec)["table2"][0]  # softmax FM, dense: every step costs the predicted FLOPs exactly
    interrupted = p.cfg.model_copy(deep=True)
    interrupted.train.steps = 1
    CountingTrainer(interrupted, progress=False).run()
    assert trained_step(p.run_dir) == 1
    args = ["repro", "table2", "--rows", "base1", *TINY, "--steps", 2, *EVAL, "--cache-dir", cache]
    result = ok(run(*args, "--out", tmp_path))
    assert "base1: resume from step 1 to step 2" in " ".join(result.output.split())
    lines = [json.loads(line) for line in (p.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    assert all(r["model_flops"] == pytest.approx(p.predicted_flops) for r in lines)
    doc = json.loads((tmp_path / "table2" / "results.json").read_text())
    base1 = doc["rows"][0]
    assert base1["status"] == "done" and base1["scale"]["model_flops"] == pytest.approx(2 * p.predicted_flops)
    assert [s["from_step"] for s in json.loads((p.run_dir / "repro_sessions.json").read_text())] == [1]
    # the same directory asked for another configuration, or fewer steps: refused, naming why
    result = run(*args, "--out", tmp_path, "--set", "train.lr=0.001")
    assert_clean_error(result, "holds a run of another configuration (train.lr: 0.0001 vs 0.001)")
    result = run(*args[:-4], "--steps", 1, *EVAL, "--cache-dir", cache, "--out", tmp_path)
    assert_clean_error(result, "is at step 2, beyond the 1 asked")


def test_the_list_command_line_is_what_eflow_train_builds(tmp_path):
    """The printed `eflow train` command resolves to the row's config (apart from where it runs)."""
    from eflow.repro.rows import train_command
    from eflow.run_config import resolve_run_config

    spec = tiny_spec("table2", tmp_path)
    p = plan(spec)["table2"][-1]
    words = shlex.split(train_command(p.row, spec.scale(p.table), p.run_dir))[2:]
    flags, sets, i = {}, [], 0
    while i < len(words):
        name = words[i][2:].replace("-", "_")
        if name in ("mva", "no_mva"):
            flags["mva"], i = name == "mva", i + 1
        elif name == "set":
            sets.append(words[i + 1])
            i += 2
        else:
            value = words[i + 1]
            flags[name], i = (float(value) if name.startswith("drop_") else value), i + 2
    cfg = resolve_run_config(None, flags, sets)
    assert cfg.model_dump() == p.cfg.model_dump()
