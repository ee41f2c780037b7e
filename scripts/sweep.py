"""Train and evaluate many run configurations side by side: the tool behind docs/results.md.

    python scripts/sweep.py SWEEP.toml --out runs/sweep [--parallel 8] [--only NAME,...]

SWEEP.toml:

    [common]                       # flags every run gets (a list of CLI words, or one string)
    train = "--preset tiny --size 16 --frames 8 --batch-size 16 --steps 1200"
    evals = ["--steps 4", "--steps 1"]   # one `eflow eval` per entry (flags after RUN_DIR)
    eval_num = 500
    prepare = ["eval train-extractor --data shapes --frames 8 --size 16"]   # eflow commands run first

    [runs.fm]                      # one table per run: extra train flags, optional own evals
    train = "--objective fm --attn softmax --token-drop none"
    evals = ["--steps 40", "--steps 4"]

    [runs.student]                 # a distilled run: `eflow distill` from another run of the sweep
    teacher = "fm"                 # waits for that run's training; [common] train flags do not apply
    distill = "--steps 1000"       # flags of `eflow distill` (begin with `pipeline` for the three stages,
                                   # whose MLCD stage, OUT/NAME/3-mlcd, is the run evaluated)

Each run is `eflow train ... --out OUT/NAME` (or `eflow distill ... --teacher OUT/TEACHER --out OUT/NAME`)
followed by its evals (`eflow eval OUT/NAME --metric
accuracy,fvd ...`); runs go `--parallel` at a time as separate processes (several fit on one GPU).
A run that finished before is skipped and one that was interrupted resumes (`--resume`), so a sweep
can be completed over several sittings. Results: OUT/results.json and OUT/results.md (one row per run
and eval: accuracy, translations' accuracy, in-domain FVD, steps, guidance, training seconds), printed
at the end; `--collect` rebuilds them from the runs' eval reports alone (e.g. from a GPU sweep's
sweep.tgz unpacked on another machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import tomllib

EFLOW = [sys.executable, "-m", "eflow.cli.app"]
TRANSLATIONS = ("left", "right", "up", "down")  # the shapes classes the small runs learn last


def words(value) -> list[str]:
    """A flag list from a TOML string or list."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def train_command(name: str, spec: dict, common: dict, out: Path) -> list[str]:
    """The command that trains run `name`, or continues it where an interrupted call left it: `eflow
    train` (resuming a committed checkpoint), or `eflow distill` from the run named by `teacher` (its
    stages continue by themselves)."""
    run_dir = out / name
    if "distill" in spec:
        flags = words(spec["distill"])
        stage = flags[:1] if flags[:1] in (["pipeline"], ["tiles"]) else []
        teacher = out / spec["teacher"]
        return [
            *EFLOW,
            "distill",
            *stage,
            "--teacher",
            str(teacher),
            "--out",
            str(run_dir),
            *flags[len(stage) :],
        ]
    flags = words(common.get("train")) + words(spec.get("train"))
    started = any((run_dir / "checkpoints").glob("step_*"))  # a committed checkpoint (docs/configuration.md)
    return [*EFLOW, "train", *flags, "--out", str(run_dir), "--resume" if started else "--overwrite"]


def evaluated_dir(name: str, spec: dict, out: Path) -> Path:
    """The run directory the evals read: the run's own, or the MLCD stage of a distillation pipeline."""
    pipeline = words(spec.get("distill"))[:1] == ["pipeline"]
    return out / name / "3-mlcd" if pipeline else out / name


def run_one(
    name: str,
    spec: dict,
    common: dict,
    out: Path,
    log_dir: Path,
    gpu: int | None,
    collect: bool = False,
    trained: dict[str, threading.Event] | None = None,
) -> list[dict]:
    """Train (or resume) one run, then evaluate it (on CUDA device `gpu` if given); one row per eval.
    collect: only read what is there (no training, no evaluation). trained: one event per run, set once
    its training is done (or failed), which a distilled run waits for on its teacher's."""
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    call = lambda cmd: subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: E731
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{name}.log").open("a")
    done_marker = run_dir / "train_seconds.json"
    if not done_marker.exists() and collect:
        return [{"run": name, "error": "not trained (--collect)"}]
    if not done_marker.exists():
        teacher = spec.get("teacher")
        if teacher and trained is not None:
            trained[teacher].wait()
        if teacher and not (out / teacher / "train_seconds.json").exists():
            return [{"run": name, "error": f"teacher {teacher} did not finish training"}]
        cmd = train_command(name, spec, common, out)
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        rc = call(cmd)
        if rc != 0:
            return [{"run": name, "error": f"train exited {rc} (see {log.name})"}]
        done_marker.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    if trained is not None:
        trained[name].set()
    seconds = json.loads(done_marker.read_text())["seconds"]
    run_dir = evaluated_dir(name, spec, out)
    rows = []
    for i, ev in enumerate(spec.get("evals", common.get("evals", [""]))):
        report = run_dir / f"eval_{i}.json"
        if not report.exists() and collect:
            rows.append({"run": name, "eval": ev, "error": "not evaluated (--collect)"})
            continue
        if not report.exists():
            num = str(spec.get("eval_num", common.get("eval_num", 500)))
            cmd = [*EFLOW, "eval", str(run_dir), "--num", num, "--metric", "accuracy,fvd", *words(ev)]
            cmd += ["--out", str(report)]
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            if call(cmd) != 0:
                rows.append({"run": name, "eval": ev, "error": f"eval failed (see {log.name})"})
                continue
        data = json.loads(report.read_text())
        per_class = data.get("accuracy", {}).get("per_class", {})
        moves = [per_class[c]["accuracy"] for c in TRANSLATIONS if c in per_class]
        rows.append(
            {
                "run": name,
                "eval": ev or "(run's sampler)",
                "sampler": data["sampling"]["sampler"],
                "steps": data["sampling"]["steps"],
                "guidance": data["sampling"]["guidance"],
                "accuracy": round(data["metrics"]["accuracy"], 3),
                "translations": round(sum(moves) / len(moves), 3) if moves else None,
                "fvd": round(data["metrics"]["fvd"], 2),
                "train_step": data["run"]["step"],
                "train_seconds": seconds,
                "train": shlex.join(words(spec.get("train", spec.get("distill")))),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| run | train flags | steps | sampler | NFE steps | w | sampler options | class acc. | translations "
        "| in-domain FVD | train s |"
    )
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['error']} |" + " |" * 9)
            continue
        moves = "" if r.get("translations") is None else f"{r['translations']:.3f}"
        lines.append(
            f"| {r['run']} | `{r['train']}` | {r['train_step']} | {r['sampler']} | {r['steps']} | "
            f"{r.get('guidance', '')} | {' '.join(sampler_options(r['eval']))} | {r['accuracy']:.3f} | "
            f"{moves} | {r['fvd']:.2f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def sampler_options(eval_flags: str) -> list[str]:
    """The KEY=VALUE pairs an eval's flags give with --sampler-option, e.g. ['renoise=false']."""
    flags = eval_flags.split()
    return [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--sampler-option"]


def guidance(eval_flags: str) -> str:
    """' w=G' when an eval's flags set the guidance scale, else '' (also for "(run's sampler)")."""
    flags = eval_flags.split()
    return f" w={flags[flags.index('--guidance') + 1]}" if "--guidance" in flags[:-1] else ""


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Two bar charts (class accuracy, in-domain FVD), one bar per run and eval, labelled run / NFE steps
    (and the guidance scale where the eval sets it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    labels = [
        f"{r['run']}\n{r['sampler']} {r['steps']}{guidance(r['eval'])} {' '.join(sampler_options(r['eval']))}".rstrip()
        for r in rows
    ]
    colours = ["tab:blue" if r["sampler"] == "euler" else "tab:orange" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows)), 4.2))
    for ax, key, name in ((axes[0], "accuracy", "sample class accuracy (higher is better)"),
                          (axes[1], "fvd", "in-domain FVD (lower is better)")):  # fmt: skip
        bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(
        title or "blue: FM + Euler with CFG; orange: the EFlow recipe + solution sampler", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--gpus", type=int, default=0, help="spread runs over this many GPUs (0: leave as is)")
    ap.add_argument(
        "--devices", default="", help="spread runs over these CUDA device ids instead, e.g. '1' or '0,1'"
    )
    ap.add_argument(
        "--plot-only", action="store_true", help="only redraw OUT/results.png from OUT/results.json"
    )
    ap.add_argument(
        "--collect",
        action="store_true",
        help="only rebuild OUT/results.* from the runs' eval reports (no training, no evaluation)",
    )
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "results.json").read_text()), args.out / "results.png")
        return
    spec = tomllib.loads(args.sweep.read_text())
    common, runs = spec.get("common", {}), spec.get("runs", {})
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in runs]
        if unknown:
            sys.exit(f"--only: unknown run(s) {', '.join(unknown)}; choices: {', '.join(runs)}")
        runs = {n: runs[n] for n in wanted}
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    for command in [] if args.collect else common.get("prepare", []):
        cmd = [*EFLOW, *words(command)]
        print(f"$ {shlex.join(cmd)}", flush=True)
        with (log_dir / "prepare.log").open("a") as log:
            if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
                sys.exit(f"prepare step failed: {shlex.join(cmd)} (see {log.name})")
    order = list(runs)
    devices = [int(d) for d in args.devices.split(",")] if args.devices else list(range(args.gpus))
    done: dict[str, list[dict]] = {}
    missing = {s["teacher"] for s in runs.values() if "teacher" in s} - set(runs)
    if missing:
        sys.exit(f"teacher(s) {', '.join(sorted(missing))} are not runs of this sweep (or not in --only)")
    trained = {n: threading.Event() for n in runs}

    def one(i: int, name: str) -> list[dict]:
        try:
            gpu = devices[i % len(devices)] if devices else None
            return run_one(name, runs[name], common, args.out, log_dir, gpu, args.collect, trained)
        finally:
            trained[name].set()  # also when it failed: its students stop waiting

    # teachers are submitted first, so that a student waiting for its teacher never holds the worker
    # the teacher needs; GPUs still go by file order
    submit = sorted(enumerate(runs), key=lambda item: "teacher" in runs[item[1]])
    # each run process its share of the CPU threads (unless set): N processes at torch's default of one
    # thread per core oversubscribe the machine
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(one, i, n): n for i, n in submit}
        for fut in as_completed(futures):
            name = futures[fut]
            done[name] = fut.result()
            rows = [row for n in order if n in done for row in done[n]]  # results so far, sweep order
            (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
            (args.out / "results.md").write_text(table(rows))
            print(f"finished {name} ({len(done)}/{len(runs)})", flush=True)
    print(table(rows))
    try:
        plot(rows, args.out / "results.png")
    except ImportError:
        print("(matplotlib is not installed: no results.png)")


if __name__ == "__main__":
    main()
