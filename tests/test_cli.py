"""The CLI end to end, and one clear message (no traceback) for each kind of bad input."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.data.video_io import read_video
from eflow.run_dir import checkpoint_dirs

runner = CliRunner()
TINY = [
    "--frames",
    "4",
    "--size",
    "8",
    "--batch-size",
    "2",
    "--device",
    "cpu",
    "--set",
    "train.preview_every=0",
]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train", "--objective", "pdg-sfm", "--mva", "--steps", 3, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_complete_run_directory(trained_run):
    for name in ("config.json", "metrics.jsonl"):
        assert (trained_run / name).is_file(), name
    (latest,) = checkpoint_dirs(trained_run)
    assert latest.name == "step_00000003"
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt", "manifest.json"):
        assert (latest / name).is_file(), name
    cfg = json.loads((trained_run / "config.json").read_text())
    options = cfg["objective"]["options"]  # resolved in full: every choice is on record
    assert cfg["objective"]["name"] == "pdg-sfm" and options["mva"] is True
    assert options["target"] == "online" and options["mva_target"] == "ema"  # the stop-gradient targets
    assert cfg["token_drop"]["options"]["group"] == [2, 2, 2]
    assert cfg["data"]["num_classes"] >= 8


@pytest.mark.parametrize("steps", [1, 4])
def test_sample_writes_a_video_that_decodes_with_the_right_frame_count(trained_run, tmp_path, steps):
    result = run("sample", trained_run, "--steps", steps, "--num", 3, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "'solution'" in result.output  # the SFM family samples with the solution map
    frames = read_video(tmp_path / "samples.mp4")
    assert frames.shape[0] == 4
    assert (tmp_path / "samples.gif").is_file() and (tmp_path / "samples.png").is_file()


def test_plugins_lists_the_builtins_with_their_owner():
    result = run("plugins", "--json")
    assert result.exit_code == 0
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("attention", "glga")]["plugin"] == "glga"
    assert ("objective", "pdg-sfm") in rows and ("token_drop", "sprint") in rows


def test_model_info_xl_softmax_is_within_ten_percent_of_table_2():
    result = run("model", "info", "--preset", "XL", "--attn", "softmax", "--json")
    assert result.exit_code == 0, result.output
    total = json.loads(result.stdout)["parameters"]["total"]
    assert abs(total - 457e6) / 457e6 < 0.10, total


def test_unknown_plugin_name_lists_the_choices(tmp_path):
    result = run("train", "--attn", "nope", "--out", tmp_path / "r", *TINY)
    assert_clean_error(result, "unknown attention 'nope'", "glga", "softmax")
    assert not (tmp_path / "r").exists()  # nothing written half-way


def test_config_file_typo_names_the_field(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nstepz = 3\n")
    assert_clean_error(run("train", "--config", config, *TINY), "train.stepz: unknown field", "steps")


def test_missing_config_file(tmp_path):
    assert_clean_error(run("train", "--config", tmp_path / "nope.toml"), "config file not found")


def test_overlapping_stages_name_the_fields(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        "[[schedule.stages]]\nstart = 0.0\nend = 0.8\n[[schedule.stages]]\nstart = 0.5\nend = 1.0\n"
    )
    assert_clean_error(run("train", "--config", config, *TINY), "stages[1]", "overlaps stages[0]")


def test_a_run_toml_with_the_old_stage_lists_trains_their_schedule_and_says_so(tmp_path):
    config = tmp_path / "old.toml"
    config.write_text(
        "[[token_drop.stages]]\nstart = 0.0\nend = 1.0\ndrop_ratio = 0.5\n"
        "[[data.stages]]\nstart = 0.0\nend = 1.0\nframes = 2\n"
    )
    result = run("train", "--config", config, *TINY, "--print-config")
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.split())
    assert "note:" in words and "token_drop.stages and data.stages read as schedule.stages" in words
    cfg = json.loads(result.output[result.output.index("{\n") :])
    assert [(s["drop_ratio"], s["frames"]) for s in cfg["schedule"]["stages"]] == [(0.5, 2)]
    assert "stages" not in cfg["token_drop"] and "stages" not in cfg["data"]


def test_mva_with_fm_is_refused():
    assert_clean_error(run("train", "--objective", "fm", "--mva", *TINY), "mva", "sfm, pdg-sfm")


def test_frames_not_divisible_by_the_patch(tmp_path):
    result = run("train", "--out", tmp_path / "r", *TINY, "--size", "9")
    assert_clean_error(result, "not divisible by the patch")


def test_sample_from_a_missing_or_corrupt_run_directory(tmp_path):
    assert_clean_error(run("sample", tmp_path / "nope"), "run directory not found")
    (tmp_path / "bad").mkdir()
    assert_clean_error(run("sample", tmp_path / "bad"), "not a run directory")
    (tmp_path / "bad" / "config.json").write_text("{ not json")
    assert_clean_error(run("sample", tmp_path / "bad"), "corrupt")


def test_sample_with_corrupt_weights(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (latest,) = checkpoint_dirs(broken)
    weights = bytearray((latest / "ema.safetensors").read_bytes())
    weights[-100] ^= 0xFF  # one flipped byte in a tensor: loads silently without the manifest's hash
    (latest / "ema.safetensors").write_bytes(bytes(weights))
    assert_clean_error(run("sample", broken), "does not match its SHA-256")
    (latest / "ema.safetensors").write_bytes(b"garbage")
    assert_clean_error(run("sample", broken), "ema.safetensors has 7 bytes, the manifest says")
    flat = tmp_path / "flat"  # a run directory written before checkpoints had their own directories
    flat.mkdir()
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"):
        shutil.copy(checkpoint_dirs(trained_run)[0] / name, flat / name)
    result = run("sample", flat, "--steps", 1, "--num", 1, "--out", tmp_path / "flat_samples")
    assert result.exit_code == 0, result.output
    (flat / "ema.safetensors").write_bytes(b"garbage")
    assert_clean_error(run("sample", flat), "corrupt")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert_clean_error(run("train", "--out", blocker / "run", *TINY), "cannot write to --out")


def test_bad_size_and_bad_override():
    assert_clean_error(run("train", "--size", "big", *TINY[:2]), "--size 'big'")
    assert_clean_error(run("train", "--set", "train.steps", *TINY[:2]), "expected KEY=VALUE")


def test_text_conditioned_run_trains_and_samples_from_captions(tmp_path):
    out = tmp_path / "text"
    result = run("train", "--condition", "text", "--steps", 2, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["data"]["condition"] == "text"
    result = run("sample", out, "--caption", "a red square moving left", "--caption", "a cyan circle growing",
                 "--steps", 2, "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sampled 2 videos" in result.output
    assert read_video(tmp_path / "s" / "samples.mp4").shape[0] == 4


def test_caption_on_a_label_run_is_refused(trained_run):
    assert_clean_error(
        run("sample", trained_run, "--caption", "a red square"), "--caption needs a text-conditioned run"
    )


def test_train_help_shows_the_config_defaults_its_options_hide():
    """The options default to None so config files can layer under them; --help still shows RunConfig's
    defaults, read from it (not written twice)."""
    from eflow.config import RunConfig

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    steps = next(line for line in result.output.splitlines() if "--steps" in line)
    assert f"(default: {RunConfig().train.steps})" in steps
    out = next(line for line in result.output.splitlines() if "--out " in line)
    assert f"(default: {RunConfig().train.out})" in out


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--seed", "-1", "--print-config"],
        ["data", "preview", "--num", "0"],
        ["data", "preview", "--seed", "-1"],
        ["data", "preview", "--frames", "0"],
    ],
)
def test_out_of_range_values_are_usage_errors_not_tracebacks(args, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, (ValueError, RuntimeError)), result.exception


def test_a_file_given_as_run_directory_and_a_missing_teacher_say_what_to_give(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nsteps = 2\n")
    assert_clean_error(run("sample", config), "is a file; give the run directory")
    result = run("distill", "--teacher", tmp_path / "none", "--out", tmp_path / "student")
    assert_clean_error(result, "eflow train --objective fm --attn softmax --token-drop none --out")


def test_num_has_the_same_short_flag_everywhere(tmp_path):
    result = runner.invoke(
        app, ["data", "preview", "-n", "2", "--frames", "2", "--size", "8", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "clip 1" in result.output and "clip 2" not in result.output
    for command in (["sample"], ["eval", "run"]):
        assert "-n" in runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
