"""`eflow repro`: train each row of a paper table as a run directory, evaluate it, collect the table.

    from eflow.repro.runner import ReproSpec, run_repro
    result = run_repro(ReproSpec(table="table3", preset="tiny", steps=200, device="cpu"))
    result.documents["table3"]["claims"]

Per table, under OUT/TABLE (OUT/TABLE-compute with `match="compute"`):

    RUN/                an ordinary run directory per row (rows sharing a run: one directory)
      eval.json         the row's report (eflow.eval.evaluate) plus a "repro" section: the settings it was
                        evaluated with; eval_<row>.json for a second row on the same run
      repro_sessions.json  the sittings that trained it (device, rows trained at once, wall seconds)
    logs/RUN.log        the output of a row run by a --parallel child process
    results.json, TABLE.png   the table (eflow.repro.report)

A row is done when its run's newest checkpoint is at the requested steps and its eval file records the
same evaluation settings; done rows are skipped. A run with a checkpoint at fewer steps resumes
(Trainer(cfg, resume=True): the saved config is the base layer, so the row's flags re-apply); a run
whose saved config differs from the row's in anything but the step count, device or bookkeeping is
refused, naming the fields (another --out, or delete it). Rows run in order in this process, or
`parallel` at a time as child processes (`python -m eflow.cli.app repro TABLE --rows ...`), one per run
directory, with CUDA_VISIBLE_DEVICES cycling over `gpus` devices when given.

`match="compute"`: the table's first row (the paper's baseline) trains `steps` steps; every other row
trains round(steps x F_first / F_row) steps, F the predicted model FLOPs per step of its configuration
(eflow.repro.accounting.predicted_step_flops), so all rows spend the first row's FLOPs. A row whose
FLOPs the counter does not know (sana) keeps `steps` and says so.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from eflow.assembly import resolve_device
from eflow.config import RunConfig, load_run_config
from eflow.errors import ConfigError, EflowError
from eflow.repro.accounting import CountingTrainer, predicted_step_flops, record_session
from eflow.repro.rows import resolve_row, select_rows, table_names, table_rows
from eflow.repro.tables import TABLES, Row, Table
from eflow.train import checkpoint
from eflow.train.trainer import TrainingStopped

MATCH_CHOICES = ("iterations", "compute")
SCALE_FLAGS = ("preset", "data", "frames", "size", "steps", "batch_size", "seed", "device")
# fields a resumed run may differ in from its row (length, where it runs, bookkeeping)
FREE_FIELDS = (
    "train.steps", "train.out", "train.device", "train.threads", "train.workers", "train.save_every",
    "train.keep_checkpoints", "train.preview_every", "train.log_every", "train.track", "data.num_classes",
    "sample.", "parallel.",
)  # fmt: skip


@dataclass
class ReproSpec:
    """What `eflow repro` was asked for: tables and rows, the scale of every row, evaluation, execution."""

    table: str = "all"  # table2, table3, table4 or all
    rows: list[str] | None = None  # row names to run (None: all); the report covers every row
    extra_rows: list[str] = field(default_factory=list)  # NAME=FLAGS (rows.extra_row)
    preset: str | None = None  # None: each table's paper preset (XL, B)
    data: str | None = None  # the scale flags; None = eflow train's default
    frames: int | None = None
    size: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None  # training seed, and the evaluation's sampling and real-subset seed
    device: str | None = None
    config: str | None = None  # a run.toml every row starts from
    sets: list[str] = field(default_factory=list)  # --set pairs applied to every row, last
    match: str = "iterations"  # iterations (the paper's rows) or compute (equal predicted FLOPs)
    eval_num: int = 2048  # real and generated clips per evaluation
    eval_batch_size: int = 64
    i3d_path: str | None = None  # FVD with I3D features (else in-domain FVD)
    cache_dir: str | None = None  # eval cache (in-domain classifier, real statistics)
    out: str = "runs/repro"
    parallel: int = 1  # rows at once (child processes when > 1)
    gpus: int = 0  # CUDA devices children cycle over (0: leave CUDA_VISIBLE_DEVICES alone)
    worker: int = 0  # > 0: a child of a --parallel parent running that many at once (writes no report)
    report_only: bool = False  # write the tables from the run folders on disk; train and evaluate nothing

    def check(self) -> None:
        if self.match not in MATCH_CHOICES:
            raise ConfigError(f"--match {self.match!r}: choose {' or '.join(MATCH_CHOICES)}")
        if self.parallel < 1:
            raise ConfigError(f"--parallel {self.parallel}: run at least 1 row at a time")
        if self.eval_num < 2:
            raise ConfigError(
                f"--eval-num must be at least 2 (a covariance needs two clips), got {self.eval_num}"
            )
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        if self.gpus < 0:
            raise ConfigError(f"--gpus {self.gpus}: give 0 (leave devices alone) or a device count")

    def scale(self, table: Table) -> dict[str, Any]:
        """The scale flags of every row of `table` (eflow train names; None = not given)."""
        flags = {name: getattr(self, name) for name in SCALE_FLAGS}
        flags["preset"] = self.preset or table.preset
        return flags

    def table_dir(self, table: str) -> Path:
        return Path(self.out) / (table if self.match == "iterations" else f"{table}-compute")

    def eval_seed(self) -> int:
        return self.seed if self.seed is not None else 0

    def child_argv(self, table: str, rows: list[str]) -> list[str]:
        """The command line of a child process running `rows` of `table` with this spec."""
        words = [sys.executable, "-m", "eflow.cli.app", "repro", table, "--rows", ",".join(rows)]
        for name in SCALE_FLAGS:
            value = getattr(self, name)
            if value is not None:
                words += [f"--{name.replace('_', '-')}", str(value)]
        for text in self.extra_rows:
            words += ["--extra-row", text]
        for pair in self.sets:
            words += ["--set", pair]
        if self.config is not None:
            words += ["--config", str(self.config)]
        if self.i3d_path is not None:
            words += ["--i3d-path", str(self.i3d_path)]
        if self.cache_dir is not None:
            words += ["--cache-dir", str(self.cache_dir)]
        words += ["--match", self.match, "--eval-num", str(self.eval_num)]
        words += ["--eval-batch-size", str(self.eval_batch_size), "--out", str(self.out)]
        return [*words, "--worker", str(self.parallel)]


@dataclass
class RowPlan:
    """One row, resolved: its run directory, config, steps and how they were chosen."""

    table: Table
    row: Row
    run_dir: Path
    cfg: RunConfig
    predicted_flops: float | None  # model FLOPs per step, predicted from the config
    steps_rule: str  # "iterations" or how compute matching set the steps
    selected: bool  # asked to run in this call (--rows)

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    @property
    def eval_path(self) -> Path:
        return self.run_dir / self.row.eval_file


# ----- planning --------------------------------------------------------------------------------------------
def plan(spec: ReproSpec) -> dict[str, list[RowPlan]]:
    """Every row of the asked tables resolved and checked (names, options, sizes) before anything runs."""
    spec.check()
    names = table_names(spec.table)
    rows = {name: table_rows(TABLES[name], spec.extra_rows) for name in names}
    picked = select_rows(rows, spec.rows)
    return {name: plan_table(spec, TABLES[name], rows[name], picked[name]) for name in names}


def plan_table(spec: ReproSpec, table: Table, rows: list[Row], picked: list[str]) -> list[RowPlan]:
    scale = spec.scale(table)
    table_dir = spec.table_dir(table.name)
    config = str(spec.config) if spec.config is not None else None
    resolved = [resolve_row(r, scale, table_dir / r.run_name, config=config, sets=spec.sets) for r in rows]
    flops = [_predicted(cfg) for cfg in resolved]
    rules = ["iterations"] * len(rows)
    if spec.match == "compute":
        reference = flops[0]
        if reference is None:
            raise EflowError(
                f"--match compute: the FLOPs of {table.name}'s reference row {rows[0].name} are unknown"
            )
        for i, (row, cfg) in enumerate(zip(rows, resolved, strict=True)):
            if flops[i] is None:
                rules[i] = "iterations (FLOPs unknown to the counter)"
                continue
            steps = max(1, round(cfg.train.steps * reference / flops[i]))
            rules[i] = (
                f"compute: {steps} x {flops[i]:.4g} ~ {cfg.train.steps} x {reference:.4g} FLOPs ({rows[0].name})"
            )
            resolved[i] = resolve_row(
                row, scale, table_dir / row.run_name, config=config, sets=spec.sets, steps=steps
            )
    plans = [
        RowPlan(table, row, table_dir / row.run_name, cfg, f, rule, row.name in picked)
        for row, cfg, f, rule in zip(rows, resolved, flops, rules, strict=True)
    ]
    _check_shared_runs(plans)
    return plans


def _predicted(cfg: RunConfig) -> float | None:
    try:
        return predicted_step_flops(cfg)
    except NotImplementedError:  # a plugin the analytic counter cannot read
        return None


def _check_shared_runs(plans: list[RowPlan]) -> None:
    """Rows sharing a run directory must train the same configuration."""
    first: dict[Path, RowPlan] = {}
    for p in plans:
        other = first.setdefault(p.run_dir, p)
        if other is not p:
            diff = config_differences(other.cfg, p.cfg)
            if diff:
                raise ConfigError(
                    f"rows {other.row.name} and {p.row.name} share {p.run_dir} but train differently ({', '.join(diff)})"
                )


def groups(plans: list[RowPlan], only_selected: bool = True) -> list[list[RowPlan]]:
    """Rows grouped by run directory, in table order (a run is trained once, then each row evaluated)."""
    by_run: dict[Path, list[RowPlan]] = {}
    for p in plans:
        if p.selected or not only_selected:
            by_run.setdefault(p.run_dir, []).append(p)
    return list(by_run.values())


# ----- state on disk ---------------------------------------------------------------------------------------
def trained_step(run_dir: Path) -> int | None:
    """The optimizer step of the run's newest checkpoint; None without one."""
    return checkpoint.checkpoint_step(run_dir)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """Fields (dotted) where `saved` differs from `wanted`, beyond FREE_FIELDS; keys only `saved` has (an
    autoencoder's fitted statistics) are ignored."""
    have, want = flatten(saved.model_dump(mode="json")), flatten(wanted.model_dump(mode="json"))
    return [
        f"{key}: {have.get(key)!r} vs {value!r}"
        for key, value in want.items()
        if not key.startswith(FREE_FIELDS) and have.get(key) != value
    ]


def eval_fingerprint(p: RowPlan, spec: ReproSpec) -> dict[str, Any]:
    """The settings an eval file must record for the row to count as evaluated."""
    from eflow.sampling import sampler_name

    return {
        "metrics": metrics_for(p.cfg),
        "extractor": "i3d" if spec.i3d_path else "indomain",
        "i3d_path": str(spec.i3d_path) if spec.i3d_path else None,
        "num": spec.eval_num,
        "sampler": sampler_name(p.cfg),
        "steps": p.row.nfe,
        "guidance": p.cfg.sample.guidance,
        "seed": spec.eval_seed(),
        "cov": "n-1",
        "weights": "ema",
    }


def metrics_for(cfg: RunConfig) -> list[str]:
    return ["fvd", "accuracy"] if cfg.data.condition == "label" else ["fvd"]


def read_eval(p: RowPlan) -> dict[str, Any] | None:
    try:
        report = json.loads(p.eval_path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def is_evaluated(p: RowPlan, spec: ReproSpec, step: int | None) -> bool:
    report = read_eval(p)
    return (
        report is not None
        and step == p.steps
        and report.get("run", {}).get("step") == p.steps
        and report.get("repro", {}).get("eval") == eval_fingerprint(p, spec)
    )


def saved_differences(p: RowPlan) -> list[str]:
    """How the run directory's saved config differs from the row's (empty: none, or no run yet)."""
    if trained_step(p.run_dir) is None:
        return []
    return config_differences(load_run_config(p.run_dir), p.cfg)


def is_done(p: RowPlan, spec: ReproSpec) -> bool:
    """Trained to the asked steps with the row's configuration, and evaluated with the asked settings."""
    return is_evaluated(p, spec, trained_step(p.run_dir)) and not saved_differences(p)


# ----- running ---------------------------------------------------------------------------------------------
@dataclass
class ReproResult:
    """Each table's document (eflow.repro.report), the files written for it, and the rows that failed."""

    documents: dict[str, dict[str, Any]]
    files: dict[str, list[Path]]
    errors: dict[str, str]  # row -> message


def run_repro(spec: ReproSpec, console: Console | None = None, command: str = "") -> ReproResult:
    """Plan, run what is not done, then (unless a --parallel child) write each table's results.json and
    chart from what is on disk. A child raises EflowError if a row failed; the parent lists failures."""
    from eflow.repro.report import build_document, write_outputs

    console = console or Console(stderr=True)
    plans = plan(spec)
    errors: dict[str, str] = {}
    if spec.report_only:
        pass  # e.g. rows finished in several sittings on other machines, their folders copied here
    elif spec.parallel > 1 and not spec.worker:
        _ensure_classifiers([p for ps in plans.values() for p in ps if p.selected], spec, console)
        errors.update(_run_children(spec, plans, console))
    else:
        for table_plans in plans.values():
            for group in groups(table_plans):
                errors.update(run_group(group, spec, console))
    if spec.worker:
        if errors:
            raise EflowError("; ".join(f"{row}: {message}" for row, message in errors.items()))
        return ReproResult({}, {}, {})
    result = ReproResult({}, {}, errors)
    for name, table_plans in plans.items():
        if not any(p.selected for p in table_plans):  # `all --rows x`: only the tables of the rows asked
            continue
        document = build_document(table_plans, spec, errors, command)
        result.documents[name] = document
        result.files[name] = write_outputs(document, spec.table_dir(name))
    return result


def _is_stop(err: EflowError) -> bool:
    """A user's Ctrl-C or a scheduler's SIGTERM during training (the trainer saved and stopped): stop all."""
    return isinstance(err, TrainingStopped)


def run_group(group: list[RowPlan], spec: ReproSpec, console: Console) -> dict[str, str]:
    """Train (or resume) one run directory, then evaluate each of its rows; returns {row: error}."""
    try:
        _train(group, spec, console)
        for p in group:
            _evaluate(p, spec, console)
    except EflowError as err:
        if _is_stop(err):
            raise EflowError(f"{err}; run the same `eflow repro` command again to continue") from None
        console.print(f"[bold red]error:[/] row {', '.join(p.row.name for p in group)}: {err}")
        return {p.row.name: str(err) for p in group}
    finally:
        gc.collect()  # the trainer's and the evaluation's models, before the next run's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {}


def _train(group: list[RowPlan], spec: ReproSpec, console: Console) -> None:
    p = group[0]
    step = trained_step(p.run_dir)
    names = ", ".join(q.row.name for q in group)
    if step is not None:
        if step > p.steps:
            raise EflowError(
                f"{p.run_dir} is at step {step}, beyond the {p.steps} asked; use another --out or raise --steps"
            )
        diff = config_differences(load_run_config(p.run_dir), p.cfg)
        if diff:
            raise EflowError(
                f"{p.run_dir} holds a run of another configuration ({'; '.join(diff[:4])}); "
                "use another --out or delete it"
            )
        if step == p.steps:
            console.print(f"[dim]{p.table.name} {names}: trained ({step} steps), skipped[/]")
            return
    resume = step is not None
    cfg = p.cfg
    if resume:
        cfg = resolve_row(
            p.row,
            spec.scale(p.table),
            p.run_dir,
            config=str(spec.config) if spec.config is not None else None,
            sets=spec.sets,
            steps=p.steps,
            resume=True,
        )
    what = f"resume from step {step}" if resume else "train"
    console.print(f"[bold]{p.table.name} {names}[/]: {what} to step {p.steps} in {p.run_dir}")
    started = time.perf_counter()
    CountingTrainer(cfg, resume=resume, console=console).run()
    device = resolve_device(cfg.train.device)
    from eflow.bench.device_peak import device_name

    record_session(
        p.run_dir,
        step or 0,
        p.steps,
        f"{device} ({device_name(device)})" if device.type == "cuda" else str(device),
        max(spec.worker, 1),
        time.perf_counter() - started,
    )


def _evaluate(p: RowPlan, spec: ReproSpec, console: Console) -> None:
    from eflow.eval.evaluate import EvalSettings, evaluate
    from eflow.eval.progress import eval_progress
    from eflow.eval.report import write_report

    if not p.selected or is_evaluated(p, spec, trained_step(p.run_dir)):
        if p.selected:
            console.print(f"[dim]{p.table.name} {p.row.name}: evaluated ({p.eval_path.name}), skipped[/]")
        return
    _ensure_classifiers([p], spec, console)
    fingerprint = eval_fingerprint(p, spec)
    options = {"path": str(spec.i3d_path)} if spec.i3d_path else {}
    settings = EvalSettings(
        metrics=list(fingerprint["metrics"]),
        extractor=fingerprint["extractor"],
        extractor_options=options,
        num=spec.eval_num,
        steps=p.row.nfe,
        seed=spec.eval_seed(),
        batch_size=spec.eval_batch_size,
        device=p.cfg.train.device,
        cache_dir=spec.cache_dir,
    )
    console.print(
        f"[bold]{p.table.name} {p.row.name}[/]: evaluate ({p.row.nfe} sampling steps, {spec.eval_num} clips)"
    )
    with eval_progress(console=console) as progress:
        report = evaluate(p.run_dir, settings, progress)
    report["repro"] = {"table": p.table.name, "row": p.row.name, "eval": fingerprint}
    write_report(report, p.eval_path)


def _ensure_classifiers(plans: list[RowPlan], spec: ReproSpec, console: Console) -> None:
    """Train and cache the in-domain classifier of each dataset and clip shape on first use."""
    from eflow.eval.classifier import classifier_path
    from eflow.eval.classifier_training import ClassifierTraining, train_and_cache
    from eflow.eval.progress import eval_progress

    seen = set()
    for p in plans:
        d = p.cfg.data
        if d.condition != "label":  # no labels: FVD only, and with another extractor than indomain
            continue
        key = (d.name, json.dumps(d.options, sort_keys=True), d.frames, d.height, d.width)
        if key in seen:
            continue
        seen.add(key)
        path = classifier_path(d.name, d.options, d.frames, d.height, d.width, spec.cache_dir)
        if path.is_file():
            continue
        console.print(
            f"in-domain classifier for {d.name} {d.frames}x{d.height}x{d.width}: none cached, training one "
            f"(eflow eval train-extractor's defaults) into {path.parent}"
        )
        with eval_progress(console=console) as progress:
            train_and_cache(
                d.name, d.options, d.frames, d.height, d.width, ClassifierTraining(),
                resolve_device(p.cfg.train.device), spec.cache_dir, progress,
            )  # fmt: skip


def child_env(spec: ReproSpec, slot: int) -> dict[str, str]:
    """A child's environment: its GPU (slot % gpus), and its share of the CPU threads unless the caller
    set OMP_NUM_THREADS (N children each running torch's default of one thread per core oversubscribe
    the machine, as torchrun's default of 1 avoids)."""
    env = dict(os.environ)
    if spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % spec.gpus)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.parallel)))
    return env


def _run_children(spec: ReproSpec, plans: dict[str, list[RowPlan]], console: Console) -> dict[str, str]:
    """Run every unfinished run directory of the tables `spec.parallel` at a time as child processes."""
    todo: list[list[RowPlan]] = []
    for table_plans in plans.values():
        for g in groups(table_plans):
            label = f"{g[0].table.name} {', '.join(p.row.name for p in g)}"
            if all(is_done(p, spec) for p in g):
                console.print(f"[dim]{label}: done, skipped[/]")
            else:
                todo.append(g)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(spec.parallel):
        slots.put(slot)

    def child(group: list[RowPlan]) -> tuple[list[RowPlan], int, Path]:
        slot = slots.get()  # a slot per running child: its GPU is slot % gpus
        try:
            env = child_env(spec, slot)
            table = group[0].table.name
            argv = spec.child_argv(table, [p.row.name for p in group])
            log = spec.table_dir(table) / "logs" / f"{group[0].run_dir.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(f"$ {shlex.join(argv)}\n")
                f.flush()
                rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
            return group, rc, log
        finally:
            slots.put(slot)

    errors: dict[str, str] = {}
    if not todo:
        return errors
    with ThreadPoolExecutor(max_workers=spec.parallel) as pool:
        futures = [pool.submit(child, g) for g in todo]
        for g in todo:
            log = spec.table_dir(g[0].table.name) / "logs" / f"{g[0].run_dir.name}.log"
            console.print(f"{g[0].table.name} {', '.join(p.row.name for p in g)}: queued (log {log})")
        for future in as_completed(futures):
            group, rc, log = future.result()
            label = f"{group[0].table.name} {', '.join(p.row.name for p in group)}"
            if rc == 0:
                console.print(f"[green]{label}: done[/]")
            else:
                console.print(f"[bold red]{label}: failed (exit {rc}); see {log}[/]")
                errors.update({p.row.name: f"exit {rc}; see {log}" for p in group})
    return errors
