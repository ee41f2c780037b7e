"""The core behind the thin commands: config resolution and resume layering, the one KEY=VALUE parser,
dataset encoding set-up, the in-domain classifier's data and preset parameter counts."""

import inspect
import json

import pytest

from eflow.config import RunConfig, parse_assignments
from eflow.errors import ConfigError, EflowError
from eflow.run_config import SCHEDULE_FLAGS, SIZE_FLAG, TRAIN_FLAGS, resolve_run_config, resume_dir


def saved_run(folder, **train):
    """A run directory holding only a config.json (what --resume layers under run.toml)."""
    cfg = RunConfig()
    cfg.train.out = str(folder)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    return folder


def test_parse_assignments_nests_dotted_keys_reads_toml_values_and_later_pairs_win():
    tree = parse_assignments(["a.b=1", " a.c = [1, 2] ", "d=cuda:1", "e=true", "a.b=2.5", "f={x=1}"])
    assert tree == {"a": {"b": 2.5, "c": [1, 2]}, "d": "cuda:1", "e": True, "f": {"x": 1}}
    assert parse_assignments(None) == {} == parse_assignments([])
    assert parse_assignments(["k=a=b"]) == {"k": "a=b"}


def test_parse_assignments_names_the_flag_and_its_example():
    with pytest.raises(ConfigError, match=r"--set 'x': expected KEY=VALUE, e.g. --set train.ema_decay=0.99"):
        parse_assignments(["x"])
    with pytest.raises(
        ConfigError, match=r"--data-option 'x': expected KEY=VALUE, e.g. --data-option frames=16"
    ):
        parse_assignments(["x"], "--data-option", "frames=16")


def test_layers_defaults_toml_flags_schedule_then_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 7\nlr = 0.5\n[model]\nattention = "softmax"\n')
    cfg = resolve_run_config(toml, {"steps": 9, "size": "16x24", "drop_ratio": 0.5}, ["train.steps=11"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.attention) == (11, 0.5, "softmax")
    assert (cfg.data.height, cfg.data.width) == (16, 24)
    assert [(s.end, s.drop_ratio) for s in cfg.token_drop.stages] == [(0.8, 0.5), (1.0, 0.0)]
    assert cfg.sample.sampler_options or cfg.objective.options  # plugin options written out in full
    # --set replaces the stages the schedule flags wrote
    cfg = resolve_run_config(
        None, {"drop_ratio": 0.2}, ["token_drop.stages=[{start=0.0, end=1.0, drop_ratio=0.5}]"]
    )
    assert [(s.end, s.drop_ratio) for s in cfg.token_drop.stages] == [(1.0, 0.5)]
    assert resolve_run_config(None, {"drop_until": 1.0, "drop_ratio": 0.3}).token_drop.stages[0].end == 1.0


def test_resume_layers_the_saved_config_under_toml_and_flags(tmp_path):
    run = saved_run(tmp_path / "run", steps=5, lr=0.25, seed=3)
    cfg = resolve_run_config(None, {"out": str(run), "steps": 8}, resume=True)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed) == (8, 0.25, 3)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[train]\nout = "{run}"\nlr = 0.125\n')
    cfg = resolve_run_config(toml, {}, ["train.out=elsewhere"], resume=True)  # run.toml's out is the run
    assert (cfg.train.steps, cfg.train.lr, cfg.train.out) == (5, 0.125, "elsewhere")
    assert resume_dir(None, None) == RunConfig().train.out
    assert resume_dir({"train": {"out": "a"}}, "b") == "b"
    assert resume_dir({"train": 3}, None) == RunConfig().train.out
    with pytest.raises(ConfigError, match="is not a run directory"):
        resolve_run_config(None, {"out": str(tmp_path / "none")}, resume=True)


@pytest.mark.parametrize(
    ("flags", "sets", "message"),
    [
        ({"drop_until": 1.5}, [], "--drop-until 1.5: give a fraction of the steps in (0, 1]"),
        ({"objective": "fm", "mva": True}, [], "needs an objective of the SFM family"),
        ({"size": "0"}, [], "--size '0': give pixels as N or HxW"),
        ({"attn": "nope"}, [], "unknown attention 'nope'"),
        ({}, ["train.steps"], "--set 'train.steps': expected KEY=VALUE"),
        ({"stepz": 3}, [], "unknown train flag(s): stepz"),
    ],
)
def test_errors_name_the_flag(flags, sets, message):
    with pytest.raises(EflowError) as err:
        resolve_run_config(None, flags, sets)
    assert message in str(err.value)


def test_every_config_option_of_eflow_train_is_a_known_flag():
    from eflow.cli.app import app

    (command,) = [c for c in app.registered_commands if c.callback.__name__ == "train"]
    params = set(inspect.signature(command.callback).parameters)
    not_layers = {"resume", "overwrite", "config", "set_", "print_config"}
    assert params - not_layers == {*TRAIN_FLAGS, SIZE_FLAG, *SCHEDULE_FLAGS}


def test_encode_config_recipe_and_train_command(tmp_path):
    from eflow.data.encode import encode_config, prepare_encode, train_command

    cfg = encode_config(
        None, {"frames": 3, "size": "8x12", "seed": 4}, ["data.autoencoder_options.normalize=false"]
    )
    assert (cfg.data.frames, cfg.data.height, cfg.data.width, cfg.train.seed) == (3, 8, 12, 4)
    job = prepare_encode(cfg, tmp_path / "lat", with_text=True, device="cpu", shard_size=4, limit=5)
    recipe = json.loads((tmp_path / "lat" / "index.json").read_text())["recipe"]
    assert recipe["dataset"] == {
        "name": "shapes",
        "options": recipe["dataset"]["options"],
        "seed": 4,
        "length": recipe["dataset"]["length"],
        "limit": 5,
    }
    assert recipe["autoencoder"]["options"]["normalize"] is False
    assert recipe["text_encoder"]["name"] == cfg.data.text_encoder and recipe["shard_size"] == 4
    assert job.train_command() == train_command(tmp_path / "lat", cfg, True)
    assert "--condition text" in job.train_command() and "--size 8x12" in job.train_command()
    with pytest.raises(ConfigError, match="--dtype"):
        prepare_encode(cfg, tmp_path / "other", dtype="float8")


def test_extractor_data_from_a_run_and_overrides(tmp_path):
    from eflow.eval.extractor_data import ExtractorData, extractor_data

    assert extractor_data() == ExtractorData("shapes", {}, 8, 32, 32)
    run = tmp_path / "run"
    cfg = RunConfig()
    cfg.data.options = {"background": "black"}
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    d = cfg.data
    assert extractor_data(run) == ExtractorData(
        "shapes", {"background": "black"}, d.frames, d.height, d.width
    )
    got = extractor_data(run, "shapes", {"x": 1}, 4, (8, 6))
    assert got == ExtractorData("shapes", {"background": "black", "x": 1}, 4, 8, 6)
    assert extractor_data(run, "captions").options == {}  # another dataset: the run's options do not apply


def test_preset_parameter_counts_on_the_meta_device():
    from eflow.model.preset_counts import preset_parameter_counts

    counts = preset_parameter_counts("tiny", "softmax")
    assert counts["total"] > 0
    with pytest.raises(EflowError, match="unknown attention"):
        preset_parameter_counts("tiny", "nope")
