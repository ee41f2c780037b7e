"""A table's rows as resolved RunConfigs: row flags -> eflow train's config layering -> one run directory each.

A row's configuration is built exactly as `eflow train` builds one (eflow.run_config.resolve_run_config):
defaults -> `--config run.toml` -> flags -> schedule flags -> `--set`, where the flags are, later winning,
the scale flags of `eflow repro` (preset, data, frames, size, steps, batch size, seed, device), then the
row's own flags (tables.py), and the `--set` pairs are the row's, then repro's (`sample.steps` = the row's
NFE, so `eflow sample RUN` samples as the paper's row does; previews only at the end), then the user's.

An extra row (`--extra-row NAME=FLAGS`) starts from the table's base row (tables.Table.base_row) and adds
FLAGS, so `--extra-row 'mine=--attn my-attn'` is the base row with another attention backend. FLAGS are
`eflow train` flags (not --out, --resume, --overwrite, --config) plus `--nfe N`, the sampling steps at
evaluation (default: the base row's).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eflow.config import RunConfig
from eflow.errors import ConfigError, EflowError
from eflow.repro.tables import ALL, TABLES, Row, Table
from eflow.run_config import SCHEDULE_FLAGS, SIZE_FLAG, TRAIN_FLAGS, resolve_run_config

BOOL_FLAGS = {"mva": "mva", "compile": "compile_", "fsdp": "fsdp"}  # --x / --no-x
NOT_ROW_FLAGS = {"out"}  # repro chooses the run directory
VALUE_FLAGS = {
    **{
        name.rstrip("_").replace("_", "-"): name
        for name in TRAIN_FLAGS
        if name not in NOT_ROW_FLAGS and name not in BOOL_FLAGS.values()
    },
    SIZE_FLAG: SIZE_FLAG,
    **{name.replace("_", "-"): name for name in SCHEDULE_FLAGS},
}
NUMBERS = {
    "drop_ratio": float,
    "drop_until": float,
    "dense_every": int,
}  # used in arithmetic before validation
REPRO_SETS = ["train.preview_every=0"]  # a preview grid at the end only
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RowFlags:
    """Parsed row flags: `eflow train` flags by their names in TRAIN_FLAGS, --set pairs, --nfe."""

    flags: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    nfe: int | None = None

    def then(self, other: RowFlags) -> RowFlags:
        """These flags with `other`'s on top (a later flag wins; --set pairs accumulate)."""
        return RowFlags({**self.flags, **other.flags}, [*self.sets, *other.sets], other.nfe or self.nfe)

    def to_text(self) -> str:
        """The flags as a command-line string (parse_row_flags reads it back)."""
        words: list[str] = []
        flag_names = {key: name for name, key in VALUE_FLAGS.items()} | {v: k for k, v in BOOL_FLAGS.items()}
        for key, value in self.flags.items():
            name = flag_names[key]
            if key in BOOL_FLAGS.values():
                words.append(f"--{name}" if value else f"--no-{name}")
            else:
                words += [f"--{name}", str(value)]
        for pair in self.sets:
            words += ["--set", pair]
        if self.nfe is not None:
            words += ["--nfe", str(self.nfe)]
        return shlex.join(words)


# a plugin an extra row switches: the base row's settings of the plugin it replaces no longer apply
PLUGIN_SETTINGS = {
    "attn": ((), "model.attention_options."),
    "objective": (("mva",), "objective.options."),
    "token_drop": ((), "token_drop.options."),
}


def on_top_of(base: RowFlags, extra: RowFlags) -> RowFlags:
    """`extra` on top of `base`; where `extra` switches a plugin, the base's options of the old one go."""
    flags, sets = dict(base.flags), list(base.sets)
    for key, (drop_flags, prefix) in PLUGIN_SETTINGS.items():
        if key in extra.flags and extra.flags[key] != base.flags.get(key):
            for name in drop_flags:
                flags.pop(name, None)
            sets = [pair for pair in sets if not pair.strip().startswith(prefix)]
    return RowFlags(flags, sets, base.nfe).then(extra)


def flag_choices() -> str:
    names = sorted([*VALUE_FLAGS, *BOOL_FLAGS, "set", "nfe"])
    return ", ".join(f"--{n}" for n in names)


def parse_row_flags(text: str, where: str) -> RowFlags:
    """`--attn glga --mva --set a.b=1 --nfe 4` -> RowFlags; `where` names the row in errors."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"{where}: cannot split {text!r} into flags ({err})") from None
    out = RowFlags()
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ConfigError(f"{where}: expected a flag, got {word!r}; flags: {flag_choices()}")
        name, eq, inline = word[2:].partition("=")
        if not eq and (name in BOOL_FLAGS or (name.startswith("no-") and name[3:] in BOOL_FLAGS)):
            key = name.removeprefix("no-")
            out.flags[BOOL_FLAGS[key]] = not name.startswith("no-")
            i += 1
            continue
        if name not in VALUE_FLAGS and name not in ("set", "nfe"):
            raise ConfigError(f"{where}: unknown flag --{name}; flags: {flag_choices()}")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(words):
            value, i = words[i + 1], i + 2
        else:
            raise ConfigError(f"{where}: --{name} needs a value")
        if name == "set":
            out.sets.append(value)
        elif name == "nfe":
            out.nfe = _number(int, value, f"{where}: --nfe")
            if out.nfe < 1:
                raise ConfigError(f"{where}: --nfe must be at least 1, got {out.nfe}")
        else:
            key = VALUE_FLAGS[name]
            out.flags[key] = _number(NUMBERS[key], value, f"{where}: --{name}") if key in NUMBERS else value
    return out


def _number(kind: type, text: str, where: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where} {text!r}: expected a {kind.__name__}") from None


def extra_row(text: str, table: Table) -> Row:
    """`NAME=FLAGS` -> a Row on top of the table's base row."""
    name, eq, flags = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise ConfigError(
            f"--extra-row {text!r}: expected NAME=FLAGS, e.g. --extra-row 'mine=--attn my-attn'"
        )
    if not ROW_NAME.match(name):
        raise ConfigError(
            f"--extra-row {name!r}: a row name is letters, digits, '-', '_', '.' (it names a directory)"
        )
    taken = [r.name for r in table.rows] + [r.run_name for r in table.rows]
    if name in taken:
        raise ConfigError(
            f"--extra-row {name!r}: {table.name} already has a row or run of that name; choose another"
        )
    base = table.row(table.base_row)
    combined = on_top_of(
        parse_row_flags(base.flags, f"row {base.name}"), parse_row_flags(flags, f"--extra-row {name}")
    )
    nfe = combined.nfe or base.nfe
    combined.nfe = None
    return Row(
        name=name,
        label=name,
        flags=combined.to_text(),
        nfe=nfe,
        paper={"flags": flags.strip()},
        source=f"--extra-row, on top of {table.name}'s {base.name}",
    )


def table_names(name: str) -> list[str]:
    """["table2"] for "table2", every table for "all"; an unknown name lists the choices."""
    if name == ALL:
        return list(TABLES)
    if name not in TABLES:
        raise ConfigError(f"unknown table {name!r}; choices: {', '.join([*TABLES, ALL])}")
    return [name]


def table_rows(table: Table, extra: list[str] | None) -> list[Row]:
    """The table's rows in the paper's order, then the extra rows (names unique)."""
    rows = list(table.rows)
    for text in extra or ():
        row = extra_row(text, table)
        if any(r.name == row.name for r in rows):
            raise ConfigError(f"--extra-row {row.name!r} given twice")
        rows.append(row)
    return rows


def select_rows(tables: dict[str, list[Row]], picked: list[str] | None) -> dict[str, list[str]]:
    """Row names to run per table: `picked` (every row when None); an unknown name lists the choices."""
    if not picked:
        return {name: [r.name for r in rows] for name, rows in tables.items()}
    known = [r.name for rows in tables.values() for r in rows]
    unknown = [name for name in picked if name not in known]
    if unknown:
        raise ConfigError(f"unknown row(s) {', '.join(map(repr, unknown))}; choices: {', '.join(known)}")
    return {name: [r.name for r in rows if r.name in picked] for name, rows in tables.items()}


def resolve_row(
    row: Row,
    scale: dict[str, Any],
    run_dir: Path,
    *,
    config: str | None = None,
    sets: list[str] | None = None,
    steps: int | None = None,
    resume: bool = False,
) -> RunConfig:
    """The row's RunConfig, through eflow train's layering (module docstring); `steps` overrides the scale's."""
    parsed = parse_row_flags(row.flags, f"row {row.name}")
    layered = RowFlags({k: v for k, v in scale.items() if v is not None}).then(parsed)
    flags = {**layered.flags, "out": str(run_dir)}
    if steps is not None:
        flags["steps"] = steps
    all_sets = [*layered.sets, f"sample.steps={row.nfe}", *REPRO_SETS, *(sets or [])]
    try:
        cfg = resolve_run_config(config, flags, all_sets, resume=resume)
    except EflowError as err:  # a bad plugin name or option, named with the row
        raise ConfigError(f"row {row.name}: {err}") from None
    if Path(cfg.train.out) != Path(run_dir):
        raise ConfigError(
            f"row {row.name}: train.out is chosen by eflow repro ({run_dir}); set the root with --out"
        )
    return cfg


def train_command(
    row: Row, scale: dict[str, Any], run_dir: Path, sets: list[str] | None = None, config: str | None = None
) -> str:
    """The `eflow train` command that trains the row's run (shown by `eflow repro --list`)."""
    words = ["eflow", "train"] + (["--config", str(config)] if config else [])
    for key, value in scale.items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    tokens = shlex.split(row.flags)
    skip = False
    for token in tokens:  # --nfe is repro's, not eflow train's
        if not skip and token != "--nfe" and not token.startswith("--nfe="):
            words.append(token)
        skip = token == "--nfe"
    for pair in [f"sample.steps={row.nfe}", *REPRO_SETS, *(sets or [])]:
        words += ["--set", pair]
    words += ["--out", str(run_dir)]
    return shlex.join(words)
