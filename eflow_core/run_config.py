"""A run's RunConfig from its sources, as `eflow train` resolves it (docs/cli.md, "How the config is built").

Each source is a layer; a later layer wins, key by key (option tables merge per key, lists are replaced):

1. the built-in defaults of RunConfig;
2. with `resume`: the run's saved config.json (the run in the `out` flag, else run.toml's train.out,
   else the default train.out);
3. run.toml;
4. the flags, by their `eflow train` names (TRAIN_FLAGS; `size` is "N" or "HxW");
5. the schedule flags drop_ratio, drop_until and dense_every, which rewrite the token drop of
   schedule.stages starting from the config resolved so far (schedule_layer);
6. --set KEY=VALUE pairs, in order (eflow.config.parse_assignments).

A source in the layout before [schedule] (token_drop.stages, data.stages) is converted to
schedule.stages as it is layered (eflow.config.convert_legacy_stages), with a note.

When no source sets data.condition, it is "text" if a text encoder was chosen or the dataset declares
that it has no labels (text_condition_reason), and the train command says so in a note.

The result is validated as a whole, then every plugin name and options table is checked against the
registries and written out in full (check_run_config).

    from eflow.run_config import resolve_run_config
    cfg = resolve_run_config("run.toml", {"steps": 100, "size": "32x48"}, ["train.ema_decay=0.99"])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from eflow.config import (
    DROP_FIELDS,
    SHAPE_FIELDS,
    RunConfig,
    build_config,
    load_run_config,
    load_toml,
    merge_stages,
    parse_assignments,
    report_notes,
    set_dotted,
)
from eflow.errors import ConfigError
from eflow.train.trackers import tracker_names

# `eflow train` flag -> the RunConfig field it sets (besides `size` and the schedule flags).
TRAIN_FLAGS = {
    "preset": "model.preset",
    "attn": "model.attention",
    "objective": "objective.name",
    "token_drop": "token_drop.name",
    "data": "data.name",
    "data_root": "data.options.root",
    "reader": "data.options.reader",
    "image_ratio": "data.image_ratio",
    "autoencoder": "data.autoencoder",
    "vae_path": "data.autoencoder_options.path",
    "text_encoder": "data.text_encoder",
    "workers": "train.workers",
    "frames": "data.frames",
    "condition": "data.condition",
    "batch_size": "train.batch_size",
    "steps": "train.steps",
    "lr": "train.lr",
    "seed": "train.seed",
    "device": "train.device",
    "out": "train.out",
    "save_every": "train.save_every",
    "keep": "train.keep_checkpoints",
    "preview_every": "train.preview_every",
    "threads": "train.threads",
    "track": "train.track",
    "precision": "train.precision",
    "mva": "objective.options.mva",
    "eval_every": "validation.every",
    "eval_num": "validation.num",
    "ac": "parallel.ac",
    "compile_": "parallel.compile",
    "fsdp": "parallel.fsdp",
    "sp": "parallel.sp",
}
SCHEDULE_FLAGS = ("drop_ratio", "drop_until", "dense_every")
SIZE_FLAG = "size"


def parse_size(text: str) -> tuple[int, int]:
    """ "32" -> (32, 32); "32x48" -> (height 32, width 48)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--size {text!r}: give pixels as N or HxW, e.g. 32 or 32x48") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size {text!r}: give pixels as N or HxW, e.g. 32 or 32x48")
    return values[0], values[1]


def config_layer(flags: Mapping[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """The RunConfig layer of explicitly given flags (None = not given): flag -> dotted field by `paths`,
    and `size` ("N" or "HxW") -> data.height, data.width."""
    layer: dict[str, Any] = {}
    for flag, dotted in paths.items():
        if flags.get(flag) is not None:
            set_dotted(layer, dotted, flags[flag])
    if flags.get(SIZE_FLAG) is not None:
        h, w = parse_size(flags[SIZE_FLAG])
        set_dotted(layer, "data.height", h)
        set_dotted(layer, "data.width", w)
    return layer


def schedule_layer(
    base: RunConfig,
    ratio: float | None = None,
    until: float | None = None,
    dense_every: int | None = None,
) -> dict:
    """schedule.stages from the simple flags: drop `ratio` for the first `until` of the steps, then dense.
    A flag not given (None) keeps what `base` has; the clip sizes of base's stages are kept (merged on
    their breakpoints); none given: no layer."""
    if ratio is None and until is None and dense_every is None:
        return {}
    drops = base.schedule.view(DROP_FIELDS)  # the token-drop schedule, without the clip sizes
    ratio = drops[0]["drop_ratio"] if ratio is None else ratio
    until = (drops[0]["end"] if len(drops) > 1 else 1.0) if until is None else until
    dense_every = drops[0]["dense_every"] if dense_every is None else dense_every
    mva_last = drops[-1]["mva_share"]
    if not 0 < until <= 1:
        raise ConfigError(f"--drop-until {until}: give a fraction of the steps in (0, 1]")
    if until >= 1.0:  # one stage: drop (or not) for the whole run; MVA, if on, for the whole run too
        drops = [
            {"start": 0.0, "end": 1.0, "drop_ratio": ratio, "dense_every": dense_every, "mva_share": mva_last}
        ]
    else:
        drops = [
            {"start": 0.0, "end": until, "drop_ratio": ratio, "dense_every": dense_every, "mva_share": 0.0},
            {"start": until, "end": 1.0, "drop_ratio": 0.0, "dense_every": 0, "mva_share": mva_last},
        ]
    return {"schedule": {"stages": merge_stages(drops, base.schedule.view(SHAPE_FIELDS))}}


def resume_dir(toml: Mapping[str, Any] | None, out: str | None) -> str:
    """The run directory a resumed run continues: `out`, else run.toml's train.out, else the default.
    (--set train.out does not move it: the saved config is read before --set applies.)"""
    train = (toml or {}).get("train")
    from_file = train.get("out") if isinstance(train, Mapping) else None
    return out or from_file or RunConfig().train.out


def check_run_config(cfg: RunConfig) -> None:
    """Check a resolved config before any work starts: the objective takes its options, every plugin
    name and options table is valid; the objective's, token drop's and sampler's options are written out
    in full (defaults included), so config.json records every choice."""
    from eflow.assembly import resolve_plugin_options, validate_plugins

    check_mva_option(cfg)
    validate_plugins(cfg)
    resolve_plugin_options(cfg)
    cfg.train.track = tracker_names(cfg.train.track)  # known names, their packages installed
    if cfg.parallel.sp > 1:
        check_sequence_parallel_heads(cfg)


def check_mva_option(cfg: RunConfig) -> None:
    """objective.options.mva (--mva / --no-mva) on an objective without an MVA option (fm): `--no-mva`
    asks for what it does anyway, so the key is left out (one flag set can switch MVA off for every
    objective); `--mva` is refused, naming the objectives that have it."""
    from eflow.registry import get_registry

    mva = cfg.objective.options.get("mva")
    options = get_registry("objective").get(cfg.objective.name).options
    if mva is None or (options is not None and "mva" in options.model_fields):
        return
    if mva:
        raise ConfigError(
            f"objective.options.mva (--mva) needs an objective of the SFM family (sfm, pdg-sfm), "
            f"not {cfg.objective.name}"
        )
    cfg.objective.options = {k: v for k, v in cfg.objective.options.items() if k != "mva"}


def check_sequence_parallel_heads(cfg: RunConfig) -> None:
    """parallel.sp must divide the heads of the preset (or of model.overrides.heads)."""
    from eflow.model.presets import PRESETS
    from eflow.parallel.sequence import check_heads

    spec = PRESETS.get(cfg.model.preset)
    if spec is None:  # an unknown preset fails with its own message when the model is built
        return
    heads = cfg.model.overrides.get("heads", spec.heads)
    where = f"preset '{cfg.model.preset}'" + (
        " with model.overrides.heads" if "heads" in cfg.model.overrides else ""
    )
    check_heads(heads, cfg.parallel.sp, where)


def text_condition_reason(layers: Iterable[Mapping[str, Any]]) -> str | None:
    """Why data.condition must be "text" when no layer sets it: a text encoder was chosen, or the dataset
    was registered with labels=False (a dataset capability); else None."""
    data = [layer["data"] for layer in layers if isinstance(layer.get("data"), Mapping)]
    if any("condition" in section for section in data):
        return None
    if any("text_encoder" in section for section in data):
        return "a text encoder was chosen"
    name = next((section["name"] for section in reversed(data) if "name" in section), RunConfig().data.name)
    from eflow.registry import get_registry

    datasets = get_registry("dataset")
    if name in datasets and not datasets.get(name).capability("labels"):
        return f"dataset '{name}' has no class labels"
    return None


def _validated(layers: list[dict], notes: list[str], config, toml: dict | None) -> RunConfig:
    """build_config of the layers; when that fails and the config file alone fails too, the file's error,
    which names the file (the merged error names only the field)."""
    try:
        return build_config(*layers, notes=notes)
    except ConfigError:
        if toml is not None:
            build_config(toml, where=f"config file {config}", notes=[])
        raise


def resolve_run_config(
    config: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] | None = None,
    *,
    resume: bool = False,
    notes: list[str] | None = None,
) -> RunConfig:
    """defaults -> (saved config when resuming) -> run.toml -> flags -> schedule flags -> --set, validated
    and checked (check_run_config). `flags` by their `eflow train` names (TRAIN_FLAGS, size, SCHEDULE_FLAGS;
    None = not given); `sets`: "section.field=value" pairs. data.condition, when no source sets it, is
    "text" if text_condition_reason finds one; `notes` (if given) gets a line saying so, and one for
    a source whose old token_drop.stages / data.stages were converted (else that is a FutureWarning)."""
    flags = dict(flags or {})
    unknown = sorted(set(flags) - set(TRAIN_FLAGS) - {SIZE_FLAG, *SCHEDULE_FLAGS})
    if unknown:
        raise ConfigError(f"unknown train flag(s): {', '.join(unknown)}")
    toml = load_toml(config) if config is not None else None
    converted: list[str] = []  # sources whose token_drop.stages / data.stages became schedule.stages
    layers: list[dict] = []
    if resume:
        run_dir = resume_dir(toml, flags.get("out"))
        saved = load_run_config(run_dir, notes=converted)
        check_resume_keeps_the_model(run_dir, saved, [toml or {}, config_layer(flags, TRAIN_FLAGS)], sets)
        layers.append(saved.model_dump(mode="json"))
    if toml is not None:
        layers.append(toml)
    layers.append(config_layer(flags, TRAIN_FLAGS))
    base = _validated(layers, converted, config, toml)
    layers.append(schedule_layer(base, *(flags.get(name) for name in SCHEDULE_FLAGS)))
    layers.append(parse_assignments(sets))
    reason = text_condition_reason(layers)
    if reason is not None:
        layers.insert(0, {"data": {"condition": "text"}})  # under every source: none of them set it
        if notes is not None:
            notes.append(f"data.condition = text ({reason}; --condition label to override)")
    cfg = _validated(layers, converted, config, toml)
    report_notes(converted, notes)
    check_plugin_option_flags(cfg, flags)
    check_run_config(cfg)
    if notes is not None:
        notes += overridden_flag_notes(flags, sets) + idle_flag_notes(cfg, flags)
    return cfg


def idle_flag_notes(cfg: RunConfig, flags: Mapping[str, Any]) -> list[str]:
    """Flags given that this config makes do nothing (stored, never used): a note each."""
    given = lambda name: flags.get(name) is not None  # noqa: E731
    notes = []
    idle = [f"--{n.replace('_', '-')}" for n in SCHEDULE_FLAGS if given(n)]
    if idle and cfg.token_drop.name == "none":
        notes.append(f"{', '.join(idle)} do nothing with --token-drop none (no token is dropped)")
    if given("eval_num") and not cfg.validation.every:
        notes.append("--eval-num does nothing without --eval-every N (no validation during training)")
    return notes


def overridden_flag_notes(flags: Mapping[str, Any], sets: Iterable[str] | None) -> list[str]:
    """A flag and a --set pair that set the same field differently: --set wins (module docstring, layer 6);
    say so, since both were asked for."""
    pairs = parse_assignments(sets)
    notes = []
    for name, dotted in TRAIN_FLAGS.items():
        value, tree = flags.get(name), pairs
        *sections, field = dotted.split(".")
        for part in sections:
            tree = _table(tree.get(part))
        if value is not None and field in tree and tree[field] != value:
            flag = f"--{name.replace('_', '-')}"
            notes.append(f"--set {dotted}={tree[field]!r} overrides {flag} {value!r} (--set pairs come last)")
    return notes


def _table(value: Any) -> Mapping[str, Any]:
    """A config source's table, or {} where the source has none (or something else: validation says so)."""
    return value if isinstance(value, Mapping) else {}


# what a resumed run cannot change: its weights (preset, attention backend) and its objective
RESUME_FIXED = {"model.preset": "--preset", "model.attention": "--attn", "objective.name": "--objective"}


def check_resume_keeps_the_model(
    run_dir: str, saved: RunConfig, sources: list[Mapping[str, Any]], sets: Iterable[str] | None
) -> None:
    """--resume with another preset, attention backend or objective than the saved run's: one clear error
    naming the field and the flag, before the saved weights or options fail to fit the new choice."""
    asked, tree = [*sources, parse_assignments(sets)], saved.model_dump(mode="json")
    for dotted, flag in RESUME_FIXED.items():
        section, field = dotted.split(".")
        values = [src[section][field] for src in asked if field in _table(src.get(section))]
        have = tree[section][field]
        if values and values[-1] != have:
            raise ConfigError(
                f"--resume continues {run_dir} as it was trained, with {dotted} = {have!r}; "
                f"{flag} {values[-1]} (or {dotted} in --config / --set) would change "
                f"{'its objective' if dotted == 'objective.name' else 'its model, whose weights would not load'}. "
                "Train that as a new run: another --out, or --overwrite to replace this one"
            )


# flags that set one plugin option: flag -> (registry kind, the data-section field naming the plugin, the
# CLI flag that chooses it)
PLUGIN_OPTION_FLAGS = {
    "data_root": ("dataset", "name", "--data"),
    "reader": ("dataset", "name", "--data"),
    "vae_path": ("autoencoder", "autoencoder", "--autoencoder"),
}


def check_plugin_option_flags(cfg: RunConfig, flags: Mapping[str, Any]) -> None:
    """A flag that sets a plugin option (--data-root, --reader, --vae-path) given with a plugin that has no
    such option: say which plugins take it, rather than the plugin's 'unknown field' for an option the
    user never wrote."""
    from eflow.registry import get_registry

    for flag, (kind, field, chooser) in PLUGIN_OPTION_FLAGS.items():
        if flags.get(flag) is None:
            continue
        option = TRAIN_FLAGS[flag].rsplit(".", 1)[1]
        name = getattr(cfg.data, field)
        registry = get_registry(kind)
        takes = {
            n for n in registry.names() if option in getattr(registry.get(n).options, "model_fields", {})
        }
        if name in registry.names() and name not in takes:
            others = sorted(takes)
            where = f"; it applies to {chooser} " + " or ".join(others) if others else ""
            raise ConfigError(
                f"--{flag.replace('_', '-')} sets the {kind}'s `{option}` option, which {kind} '{name}' does not have{where}"
            )
