"""The core behind the thin commands: config resolution and resume layering, the one KEY=VALUE parser,
dataset encoding set-up, the in-domain classifier's data and preset parameter counts."""

import inspect
import json

import pytest

from eflow.config import RunConfig, build_config, parse_assignments
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
    assert [(s.end, s.drop_ratio) for s in cfg.schedule.stages] == [(0.8, 0.5), (1.0, 0.0)]
    assert cfg.sample.sampler_options or cfg.objective.options  # plugin options written out in full
    # --set replaces the stages the schedule flags wrote
    cfg = resolve_run_config(
        None, {"drop_ratio": 0.2}, ["schedule.stages=[{start=0.0, end=1.0, drop_ratio=0.5}]"]
    )
    assert [(s.end, s.drop_ratio) for s in cfg.schedule.stages] == [(1.0, 0.5)]
    assert resolve_run_config(None, {"drop_until": 1.0, "drop_ratio": 0.3}).schedule.stages[0].end == 1.0


def test_schedule_flags_keep_the_clip_sizes_of_the_stages(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[[schedule.stages]]\nstart = 0.0\nend = 0.5\nheight = 16\n"
        "[[schedule.stages]]\nstart = 0.5\nend = 1.0\ndrop_ratio = 0.5\n"
    )
    cfg = resolve_run_config(toml, {"drop_until": 0.25, "drop_ratio": 0.75})
    got = [(s.start, s.end, s.drop_ratio, s.height) for s in cfg.schedule.stages]
    assert got == [(0.0, 0.25, 0.75, 16), (0.25, 0.5, 0.0, 16), (0.5, 1.0, 0.0, None)]
    assert cfg.schedule.shapes(cfg.data) == [(8, 16, 32), (8, 16, 32), (8, 32, 32)]
    assert cfg.schedule.view(["height"]) == [
        {"start": 0.0, "end": 0.5, "height": 16},
        {"start": 0.5, "end": 1.0, "height": None},
    ]


OLD_TOKEN_DROP = [
    {"start": 0.0, "end": 0.8, "drop_ratio": 0.75, "dense_every": 0, "mva_share": 0.0},
    {"start": 0.8, "end": 1.0, "drop_ratio": 0.0, "dense_every": 0, "mva_share": 0.25},
]
OLD_DATA = [
    {"start": 0.0, "end": 0.5, "frames": 4, "height": 16, "width": None},
    {"start": 0.5, "end": 1.0, "frames": None, "height": None, "width": None},
]


def old_run(folder, data_stages):
    """A run directory with a config.json written before [schedule]: token_drop.stages, data.stages."""
    tree = RunConfig().model_dump(mode="json")
    del tree["schedule"]
    tree["token_drop"]["stages"] = OLD_TOKEN_DROP
    tree["data"]["stages"] = data_stages
    tree["train"]["out"] = str(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(tree))
    return folder


def test_an_old_config_json_resumes_with_its_stages_merged_into_schedule(tmp_path):
    run = old_run(tmp_path / "run", OLD_DATA)
    notes = []
    cfg = resolve_run_config(None, {"out": str(run)}, resume=True, notes=notes)
    got = [(s.start, s.end, s.drop_ratio, s.mva_share, s.frames, s.height) for s in cfg.schedule.stages]
    assert got == [
        (0.0, 0.5, 0.75, 0.0, 4, 16),  # drop and MVA from the token-drop stage, shape from the data stage
        (0.5, 0.8, 0.75, 0.0, None, None),
        (0.8, 1.0, 0.0, 0.25, None, None),
    ]
    assert notes == [
        f"{run / 'config.json'}: token_drop.stages and data.stages read as schedule.stages; "
        "a run's stages are one [schedule] section now (docs/configuration.md#schedule)"
    ]
    # step by step, the same drop ratio, MVA share and clip size as the two old lists gave
    old = RunConfig()
    for step in range(cfg.train.steps):
        frac = step / cfg.train.steps
        drop = next(s for s in OLD_TOKEN_DROP if frac < s["end"])
        shape = next(s for s in OLD_DATA if frac < s["end"])
        stage = cfg.schedule.stage_at(step, cfg.train.steps)[1]
        assert (stage.drop_ratio, stage.mva_share) == (drop["drop_ratio"], drop["mva_share"])
        assert cfg.schedule.shape_at(step, cfg.train.steps, cfg.data) == (
            shape["frames"] or old.data.frames,
            shape["height"] or old.data.height,
            shape["width"] or old.data.width,
        )
    # without a curriculum (data.stages = []) the stages are the token-drop ones, as a new run's
    plain = resolve_run_config(None, {"out": str(old_run(tmp_path / "plain", []))}, resume=True, notes=[])
    assert plain.schedule == RunConfig().schedule


def test_old_stage_keys_convert_per_layer_and_warn_without_a_notes_list(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[[data.stages]]\nstart = 0.0\nend = 0.5\nframes = 2\n[[data.stages]]\nstart = 0.5\nend = 1.0\n"
    )
    with pytest.warns(FutureWarning, match=r"data\.stages read as schedule\.stages"):
        cfg = resolve_run_config(toml, {"drop_ratio": 0.5})
    got = [(s.start, s.end, s.drop_ratio, s.frames) for s in cfg.schedule.stages]
    assert got == [(0.0, 0.5, 0.5, 2), (0.5, 0.8, 0.5, None), (0.8, 1.0, 0.0, None)]
    # an old key in a later layer keeps what earlier layers set for the other half
    cfg = resolve_run_config(
        toml, {}, ["token_drop.stages=[{start=0.0, end=1.0, drop_ratio=0.25}]"], notes=[]
    )
    assert [(s.end, s.drop_ratio, s.frames) for s in cfg.schedule.stages] == [
        (0.5, 0.25, 2),
        (1.0, 0.25, None),
    ]


def test_old_stage_keys_and_schedule_together_are_an_error(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[[token_drop.stages]]\nstart = 0.0\nend = 1.0\n[[schedule.stages]]\nstart = 0.0\nend = 1.0\n"
    )
    with pytest.raises(ConfigError, match=r"gives both schedule and the old token_drop\.stages"):
        resolve_run_config(toml, {})
    with pytest.raises(ConfigError, match=r"token_drop\.stages\.0\.frames: unknown field"):
        resolve_run_config(None, {}, ["token_drop.stages=[{start=0.0, end=1.0, frames=2}]"])


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
        ({"attn": "softmax"}, [], "with model.attention = 'glga'; --attn softmax"),
        ({"preset": "B"}, [], "with model.preset = 'tiny'; --preset B"),
        ({"objective": "sfm"}, [], "with objective.name = 'pdg-sfm'; --objective sfm"),
        ({}, ["model.attention=sana"], "--attn sana (or model.attention in --config / --set)"),
    ],
)
def test_resume_refuses_another_model_or_objective_naming_the_flag(tmp_path, flags, sets, message):
    """Not the saved weights' or options' own errors ('does not fit', 'p_drop: unknown field') for a
    change the user asked for: one message naming the field, the flag and the way out."""
    run = saved_run(tmp_path / "run", steps=5, lr=0.25, seed=3)
    with pytest.raises(ConfigError) as err:
        resolve_run_config(None, {"out": str(run), **flags}, sets, resume=True)
    assert message in str(err.value) and "another --out, or --overwrite" in str(err.value)
    same = resolve_run_config(None, {"out": str(run), "attn": "glga", "preset": "tiny"}, resume=True)
    assert same.model.attention == "glga"


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


def test_no_mva_is_accepted_by_an_objective_without_mva():
    """`--no-mva` asks for what fm does anyway: the key is left out, not refused; sfm keeps it."""
    fm = resolve_run_config(None, {"objective": "fm", "mva": False})
    assert "mva" not in fm.objective.options
    sfm = resolve_run_config(None, {"objective": "sfm", "mva": False})
    assert sfm.objective.options["mva"] is False


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


def test_a_bad_field_in_the_config_file_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nstpes = 3\n")
    with pytest.raises(ConfigError, match=r"config file .*run\.toml[\s\S]*train\.stpes: unknown field"):
        resolve_run_config(path, {"steps": 2})


def test_set_refuses_list_items_and_empty_keys_with_the_whole_list_syntax():
    with pytest.raises(
        ConfigError, match=r"list items cannot be set one by one; set the whole list schedule\.stages"
    ):
        parse_assignments(["schedule.stages.0.drop_ratio=0.5"])
    with pytest.raises(ConfigError, match="the key must be a dotted field name"):
        parse_assignments(["=3"])


def test_a_plugin_option_flag_with_a_plugin_without_that_option_names_the_flag_and_who_takes_it(tmp_path):
    with pytest.raises(
        ConfigError, match=r"--vae-path sets the autoencoder's `path` option.*--autoencoder wan"
    ):
        resolve_run_config(None, {"vae_path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"--data-root .* dataset 'shapes' does not have; .*video-folder"):
        resolve_run_config(None, {"data_root": str(tmp_path)})
    cfg = resolve_run_config(None, {"data": "video-folder", "data_root": str(tmp_path)})
    assert cfg.data.options["root"] == str(tmp_path)


def test_a_runs_config_json_is_a_config_file_too(tmp_path):
    """--config takes what every run writes (config.json) as well as run.toml; bad JSON names the file."""
    run = saved_run(tmp_path / "run", steps=7, lr=0.125, seed=5)
    cfg = resolve_run_config(run / "config.json", {"out": str(tmp_path / "again")})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed, cfg.train.out) == (
        7,
        0.125,
        5,
        str(tmp_path / "again"),
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        resolve_run_config(bad, {})
    bad.write_text("[1]")
    with pytest.raises(ConfigError, match="a config is a JSON object of sections, not list"):
        resolve_run_config(bad, {})


def test_flags_this_config_makes_idle_get_a_note():
    """Flags stored but never used (dropping flags with --token-drop none, --eval-num without
    --eval-every) are said so, not silently kept."""
    notes: list[str] = []
    resolve_run_config(
        None, {"token_drop": "none", "drop_ratio": 0.5, "dense_every": 3, "eval_num": 8}, notes=notes
    )
    assert notes == [
        "--drop-ratio, --dense-every do nothing with --token-drop none (no token is dropped)",
        "--eval-num does nothing without --eval-every N (no validation during training)",
    ]
    quiet: list[str] = []
    resolve_run_config(None, {"drop_ratio": 0.5, "eval_num": 8, "eval_every": 2}, notes=quiet)
    assert quiet == []


def test_trackers_given_as_text_become_a_list():
    """--set train.track=tensorboard (as --track takes it) is the list ['tensorboard'], not a type error."""
    assert build_config(parse_assignments(["train.track=tensorboard"])).train.track == ["tensorboard"]
    both = build_config(parse_assignments(["train.track='tensorboard, wandb'"]))
    assert both.train.track == ["tensorboard", "wandb"]


def test_a_set_pair_overriding_a_flag_is_said():
    notes: list[str] = []
    cfg = resolve_run_config(None, {"steps": 3, "lr": 0.5}, ["train.steps=2", "train.lr=0.5"], notes=notes)
    assert cfg.train.steps == 2  # --set comes last
    assert notes == ["--set train.steps=2 overrides --steps 3 (--set pairs come last)"]  # equal lr: quiet
