"""RunConfig: one pydantic model for a run. Sources, later wins: defaults -> run.toml -> CLI flags."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eflow.errors import ConfigError
from eflow.parallel.config import ParallelSection
from eflow.registry.registry import format_validation_error
from eflow.text_file import read_utf8

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The network: a preset from EFlow Table 5 plus the self-attention backend."""

    preset: str = Field("tiny", description="model preset: tiny (CPU), B, XL, XXL, 1.5B (EFlow Table 5)")
    attention: str = Field("glga", description="self-attention backend (registry 'attention')")
    attention_options: dict[str, Any] = Field(default_factory=dict, description="options of the backend")
    guidance_embed: bool = Field(True, description="embed the guidance scale w (EFlow B.1)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="preset fields to override, e.g. patch = [1, 2, 2], dim = 128"
    )


DEFAULT_OBJECTIVE = "pdg-sfm"  # the EFlow recipe: PDG-SFM ...
DEFAULT_OBJECTIVE_OPTIONS = {"mva": True}  # ... with the MVA regularizer


class ObjectiveSection(Section):
    """The training objective (registry 'objective') and its options."""

    name: str = Field(DEFAULT_OBJECTIVE, description="objective: fm, sfm, pdg-sfm, ...")
    options: dict[str, Any] = Field(
        default_factory=dict, description="options of the objective (e.g. mva = true)"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """The default objective starts from the EFlow recipe's options (mva on); given options win."""
        if isinstance(data, dict) and data.get("name", DEFAULT_OBJECTIVE) == DEFAULT_OBJECTIVE:
            data = {**data, "options": {**DEFAULT_OBJECTIVE_OPTIONS, **(data.get("options") or {})}}
        return data


DROP_FIELDS = ("drop_ratio", "dense_every", "mva_share")  # what a stage does to the model and objective
SHAPE_FIELDS = ("frames", "height", "width")  # the clip size of a stage (the curriculum)


class ScheduleStage(Section):
    """A stretch [start, end) of training (fractions of the steps): its token drop, MVA share and clip size."""

    start: float = Field(ge=0.0, le=1.0, description="where the stage starts, as a fraction of steps")
    end: float = Field(ge=0.0, le=1.0, description="where the stage ends, as a fraction of steps")
    drop_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of tokens the middle stack drops")
    dense_every: int = Field(0, ge=0, description="one dense (no-drop) step every n steps; 0 = never")
    mva_share: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the batch trained with MVA")
    frames: int | None = Field(None, ge=1, description="frames per clip; unset = data.frames")
    height: int | None = Field(None, ge=1, description="clip height in pixels; unset = data.height")
    width: int | None = Field(None, ge=1, description="clip width in pixels; unset = data.width")

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleStage:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self

    def sets_shape(self) -> bool:
        """Whether the stage sets any of frames / height / width."""
        return any(getattr(self, name) is not None for name in SHAPE_FIELDS)

    def shape(self, data: DataSection) -> tuple[int, int, int]:
        """(frames, height, width) of the stage's clips: its own where set, else the data section's."""
        return (
            data.frames if self.frames is None else self.frames,
            data.height if self.height is None else self.height,
            data.width if self.width is None else self.width,
        )


def check_contiguous(stages: list[ScheduleStage]) -> None:
    """Stages must tile [0, 1]: start at 0, each where the last ended, end at 1."""
    if stages[0].start != 0.0:
        raise ValueError(f"stages[0].start must be 0 (got {stages[0].start})")
    for i in range(1, len(stages)):
        prev, cur = stages[i - 1], stages[i]
        if cur.start < prev.end:
            raise ValueError(
                f"stages[{i}] (start={cur.start}) overlaps stages[{i - 1}] (end={prev.end}); "
                "each stage must start where the previous one ends"
            )
        if cur.start > prev.end:
            raise ValueError(f"gap between stages[{i - 1}].end={prev.end} and stages[{i}].start={cur.start}")
    if stages[-1].end != 1.0:
        raise ValueError(f"stages[-1].end must be 1 (got {stages[-1].end})")


def eflow_stages() -> list[ScheduleStage]:
    """EFlow's Kinetics recipe (C.1): 75% drop, no MVA for 80% of steps; then dense with MVA."""
    return [
        ScheduleStage(start=0.0, end=0.8, drop_ratio=0.75, mva_share=0.0),
        ScheduleStage(start=0.8, end=1.0, drop_ratio=0.0, mva_share=0.25),
    ]


def merge_stages(*schedules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage lists (dicts with start, end and some fields) that each tile [0, 1], merged on all their
    breakpoints: each merged stage takes the fields of the stage of every list that covers it."""
    cuts = sorted({stage["start"] for stages in schedules for stage in stages} | {1.0})
    merged = []
    for start, end in pairwise(cuts):
        stage = {"start": start, "end": end}
        for stages in schedules:
            cover = next(s for s in stages if s["start"] <= start < s["end"])
            stage.update({k: v for k, v in cover.items() if k not in ("start", "end")})
        merged.append(stage)
    return merged


class ScheduleSection(Section):
    """The stages of a run, tiling [0, 1] of the steps: token drop, MVA share and clip size of each."""

    stages: list[ScheduleStage] = Field(
        default_factory=eflow_stages, description="the stages, in order; default: EFlow's Kinetics recipe"
    )

    @model_validator(mode="after")
    def _contiguous(self) -> ScheduleSection:
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        check_contiguous(self.stages)
        return self

    def stage_at(self, step: int, total_steps: int) -> tuple[int, ScheduleStage]:
        """The stage index and stage of an optimizer step."""
        frac = step / max(total_steps, 1)
        for i, stage in enumerate(self.stages):
            if frac < stage.end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def drop_ratio_at(self, step: int, total_steps: int) -> float:
        """The drop ratio at a step, with the stage's dense interleave applied."""
        _, stage = self.stage_at(step, total_steps)
        if stage.dense_every and (step + 1) % stage.dense_every == 0:
            return 0.0
        return stage.drop_ratio

    def shapes(self, data: DataSection) -> list[tuple[int, int, int]]:
        """(frames, height, width) of every stage's clips, the data section's where a stage sets none."""
        return [stage.shape(data) for stage in self.stages]

    def shape_at(self, step: int, total_steps: int, data: DataSection) -> tuple[int, int, int]:
        """(frames, height, width) of the clips of an optimizer step."""
        return self.stage_at(step, total_steps)[1].shape(data)

    def view(self, fields: Iterable[str]) -> list[dict[str, Any]]:
        """The stages seen through `fields` only ({start, end, *fields} each), neighbours that agree joined:
        view(DROP_FIELDS) is the token-drop schedule, view(SHAPE_FIELDS) the clip-size curriculum."""
        fields, out = tuple(fields), []
        for stage in self.stages:
            values = {name: getattr(stage, name) for name in fields}
            if out and all(out[-1][name] == value for name, value in values.items()):
                out[-1]["end"] = stage.end
            else:
                out.append({"start": stage.start, "end": stage.end, **values})
        return out


class TokenDropSection(Section):
    """Token dropping for the middle stack (registry 'token_drop'); its ratio per stage is in [schedule]."""

    name: str = Field("sprint", description="token-drop strategy: none, random, sprint")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the strategy")


class DataSection(Section):
    """Where clips come from and how they become latents and conditions."""

    name: str = Field("shapes", description="dataset (registry 'dataset')")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the dataset")
    frames: int = Field(8, ge=1, description="frames per clip")
    height: int = Field(32, ge=1, description="clip height in pixels")
    width: int = Field(32, ge=1, description="clip width in pixels")
    autoencoder: str = Field("pixel", description="autoencoder (registry 'autoencoder')")
    autoencoder_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the autoencoder"
    )
    condition: Literal["label", "text"] = Field("label", description="condition on class labels or captions")
    num_classes: int | None = Field(None, ge=1, description="classes of the dataset (resolved at train time)")
    text_encoder: str = Field("hashed", description="text encoder when condition = text")
    text_encoder_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the text encoder"
    )
    image_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="share of steps trained on the dataset's images (one-frame clips)"
    )


class TrainSection(Section):
    """Optimization and bookkeeping."""

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="global batch size (split across ranks)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (EFlow C.1: constant 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant (EFlow C.1) or cosine decay to lr * min_lr_ratio"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / lr of the cosine schedule")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    ema_decay: float = Field(0.999, ge=0, le=1, description="EMA decay (warmed up as (1+n)/(10+n))")
    seed: int = Field(0, ge=0, description="seed of everything random in the run")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on GPU, fp32 on CPU"
    )
    out: str = Field("runs/demo", description="run directory")
    save_every: int = Field(250, ge=0, description="checkpoint every n steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="committed checkpoints kept (the newest ones)")
    log_every: int = Field(1, ge=1, description="write metrics every n steps")
    preview_every: int = Field(
        250, ge=0, description="write a sample preview PNG every n steps (0 = only at the end)"
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default)")
    workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes; unset = auto (0 for procedural datasets)"
    )
    track: list[str] = Field(
        default_factory=list,
        description="experiment trackers mirroring metrics and previews: tensorboard, wandb",
    )

    @field_validator("track", mode="before")
    @classmethod
    def _track_from_text(cls, track: Any) -> Any:
        """'tensorboard' or 'tensorboard,wandb' (as --track takes it, e.g. from --set) -> a list."""
        return (
            [name.strip() for name in track.split(",") if name.strip()] if isinstance(track, str) else track
        )

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {list(betas)}")
        return betas


class SampleSection(Section):
    """Defaults of `eflow sample` (EFlow B.3: 4 steps, w = 4.0)."""

    sampler: str | None = Field(None, description="sampler; None = the objective's own (euler for fm)")
    sampler_options: dict[str, Any] = Field(default_factory=dict, description="options of the sampler")
    steps: int = Field(4, ge=1, description="sampling steps")
    guidance: float = Field(4.0, ge=0, allow_inf_nan=False, description="guidance scale w")
    num: int = Field(8, ge=1, description="videos per call")
    batch_size: int = Field(16, ge=1, description="videos generated at once (memory; not the result)")
    seed: int = Field(0, description="sampling seed")
    fps: int = Field(8, ge=1, description="frames per second of written videos")


def sampling_settings(section: SampleSection, **flags: Any) -> SampleSection:
    """`section` with the given command-line flags applied (None = keep; sampler_options are merged over
    the section's, e.g. {"shift": 1.0}), validated by the same model as the config; an error names the
    flag (--guidance nan), not the field."""
    given = {name: value for name, value in flags.items() if value is not None}
    if "sampler_options" in given:
        given["sampler_options"] = {**section.sampler_options, **given["sampler_options"]}
    try:
        return SampleSection.model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = str(e["loc"][0]) if e["loc"] else "?"
            problems.append(f"--{name.replace('_', '-')} {given.get(name)!r}: {e['msg']}")
        raise ConfigError("; ".join(problems)) from None


class ValidationSection(Section):
    """Validation during training: every `every` steps, sample with the EMA weights and measure quality
    against cached real statistics (eflow eval's core), logged as val_* fields of metrics.jsonl."""

    every: int = Field(0, ge=0, description="validate every n optimizer steps (0 = never)")
    num: int = Field(256, ge=2, description="generated clips (and real clips) per validation")
    metrics: list[Literal["fvd", "accuracy"]] = Field(
        default_factory=lambda: ["fvd", "accuracy"],
        description="fvd and/or accuracy (class accuracy needs a label-conditioned run; dropped for text runs)",
    )
    extractor: str = Field("indomain", description="feature extractor for FVD (registry 'feature_extractor')")
    extractor_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the extractor, e.g. path = '/models/i3d.pt' for i3d"
    )
    batch_size: int = Field(64, ge=1, description="clips per generation batch")

    @field_validator("metrics")
    @classmethod
    def _some_metric(cls, metrics: list[str]) -> list[str]:
        if not metrics:
            raise ValueError("give fvd, accuracy or both")
        return metrics


class RunConfig(Section):
    """Everything that defines a run; written as config.json beside every checkpoint."""

    model: ModelSection = Field(default_factory=ModelSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    token_drop: TokenDropSection = Field(default_factory=TokenDropSection)
    data: DataSection = Field(default_factory=DataSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts; values of `override` win, option dicts merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree["a"]["b"] = value for "a.b" (creating dicts on the way)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A TOML-ish scalar from the command line: numbers, true/false, [lists], else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(
    pairs: Iterable[str] | None, flag: str = "--set", example: str = "train.ema_decay=0.99"
) -> dict[str, Any]:
    """KEY=VALUE pairs from the command line -> a nested dict, in order (a later pair wins): a dotted key
    makes tables ("a.b=1" -> {"a": {"b": 1}}), a value is read by parse_value (TOML-ish). A pair without
    "=" is an error naming `flag`, e.g. "--set 'x': expected KEY=VALUE, e.g. --set train.ema_decay=0.99"."""
    tree: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} {example}")
        key, value = (part.strip() for part in pair.split("=", 1))
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{flag} {pair!r}: the key must be a dotted field name, e.g. {flag} {example}")
        if any(part.isdigit() for part in parts):
            listed = ".".join(parts[: next(i for i, p in enumerate(parts) if p.isdigit())])
            raise ConfigError(
                f"{flag} {pair!r}: list items cannot be set one by one; set the whole list {listed}, e.g. "
                f"{flag} 'schedule.stages=[{{start=0.0,end=1.0,drop_ratio=0.5}}]' or {flag} 'train.track=[\"wandb\"]'"
            )
        set_dotted(tree, key, parse_value(value))
    return tree


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run.toml, or a run's config.json (a file ending in .json: what every run writes and
    --print-config prints), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            tree = json.loads(read_utf8(path))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config is a JSON object of sections, not {type(tree).__name__}")
        return tree
    try:
        return tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


LEGACY_STAGES = {"token_drop": DROP_FIELDS, "data": SHAPE_FIELDS}  # section -> what its old `stages` held


def convert_legacy_stages(
    layer: dict[str, Any], before: dict[str, Any], where: str
) -> tuple[dict[str, Any], str | None]:
    """A layer in the layout before [schedule] (token_drop.stages: the drop and MVA schedule; data.stages:
    the clip-size curriculum) rewritten with schedule.stages, plus a note naming the keys it converted
    (None when it has neither). The two lists merge on their breakpoints (merge_stages); one the layer
    does not give is the schedule of the layers `before` it, seen through its fields. A layer that gives
    schedule as well is an error."""
    old = [name for name in LEGACY_STAGES if isinstance(layer.get(name), dict) and "stages" in layer[name]]
    if not old:
        return layer, None
    keys = " and ".join(f"{name}.stages" for name in old)
    if "schedule" in layer:
        raise ConfigError(
            f"{where} gives both schedule and the old {keys}; write the stages once, as schedule.stages"
        )
    try:
        current = ScheduleSection.model_validate(before.get("schedule", {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{where} (schedule)", ScheduleSection)) from None
    parts = {name: current.view(fields) for name, fields in LEGACY_STAGES.items()}
    layer = {name: dict(value) if name in old else value for name, value in layer.items()}
    for name in old:
        parts[name] = _legacy_stages(layer[name].pop("stages"), name, where)
    layer["schedule"] = {"stages": merge_stages(*parts.values())}
    note = (
        f"{where}: {keys} read as schedule.stages; a run's stages are one [schedule] section now "
        "(docs/configuration.md#schedule)"
    )
    return layer, note


def _legacy_stages(items: Any, name: str, where: str) -> list[dict[str, Any]]:
    """The stages of an old `{name}.stages` list as dicts of start, end and that section's fields,
    validated with the errors naming the old key; an empty data.stages is data's size throughout."""
    key, fields = f"{name}.stages", LEGACY_STAGES[name]
    if name == "data" and items == []:
        return [{"start": 0.0, "end": 1.0, **dict.fromkeys(fields)}]
    allowed = ("start", "end", *fields)
    problems = [
        f"  {key}.{i}.{field}: unknown field; valid fields: {', '.join(allowed)}"
        for i, item in enumerate(items if isinstance(items, list) else [])
        if isinstance(item, dict)
        for field in sorted(set(item) - set(allowed))
    ]
    if not problems:
        try:
            stages = ScheduleSection.model_validate({"stages": items}).stages
            return [{field: getattr(stage, field) for field in allowed} for stage in stages]
        except ValidationError as err:
            for e in err.errors():
                problems.append(f"  {'.'.join(str(p) for p in (key, *e['loc'][1:]))}: {e['msg']}")
    raise ConfigError("\n".join([f"invalid {where}:", *problems]))


def report_notes(found: list[str], notes: list[str] | None) -> None:
    """Add each note of `found` to `notes` once, or warn with it (FutureWarning) when no list is given."""
    for note in found:
        if notes is None:
            warnings.warn(note, FutureWarning, stacklevel=3)
        elif note not in notes:
            notes.append(note)


def build_config(
    *layers: dict[str, Any], where: str = "run config", notes: list[str] | None = None
) -> RunConfig:
    """Validate defaults <- layers (later wins) into a RunConfig; errors name the dotted field. A layer in
    the old layout (token_drop.stages, data.stages) is converted first (convert_legacy_stages); the note
    saying so goes to `notes`, or is a FutureWarning when no list is given."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer, note = convert_legacy_stages(layer, merged, where)
        if note is not None:
            report_notes([note], notes)
        merged = deep_merge(merged, layer)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where, RunConfig)) from None


def load_run_config(run_dir: str | Path, notes: list[str] | None = None, train_flags: str = "") -> RunConfig:
    """The resolved config of a run directory: its newest checkpoint's config.json (what its weights were
    trained with), else the one written when the run started. A config.json from before [schedule] loads
    with its stages converted (build_config; the note goes to `notes`). `train_flags`: what the error for
    a directory without one suggests training with (a distillation teacher: an FM run)."""
    from eflow.run_dir import config_path

    path = config_path(run_dir)
    if not path.is_file():
        flags = f"{train_flags} " if train_flags else ""
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.json); train one with `eflow train {flags}--out {run_dir}`"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is corrupt (not JSON text: {err}); retrain or restore it") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} is corrupt (a {type(data).__name__}, not a JSON object); retrain or restore it"
        )
    found: list[str] = []
    cfg = build_config(data, where=str(path), notes=found)
    report_notes(found, notes)  # a warning names the caller, not this line
    return cfg
