"""scripts/sweep.py, the tool behind docs/results.md: trained and distilled runs side by side, a student
waiting for its teacher, failures as rows (not a stuck sweep), and --collect rebuilding the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"

SWEEP = """
[common]
train = "--preset tiny --size 16 --frames 8 --batch-size 4 --steps 3 --set train.preview_every=0 --device cpu"
evals = ["--steps 2 --cache-dir CACHE --batch-size 8 --device cpu"]
eval_num = 8
prepare = ["eval train-extractor --data shapes --frames 8 --size 16 --train-clips 64 --heldout-clips 16 --epochs 1 --net-width 8 --device cpu --cache-dir CACHE"]

[runs.student]  # before its teacher in the file: it must wait for it, not fail
teacher = "fm"
distill = "--steps 2 --batch-size 4 --teacher-steps 4 --segments 2 --device cpu"
evals = ["--cache-dir CACHE --batch-size 8 --device cpu"]
[runs.fm]
train = "--objective fm --attn softmax --token-drop none"
[runs.broken]
train = "--objective fm --attn softmax --token-drop none --size 18"
[runs.orphan]
teacher = "broken"
distill = "--steps 2"
"""


def sweep(toml: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), str(toml), "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_sweep_trains_distills_and_reports_failures_as_rows(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(SWEEP.replace("CACHE", str(tmp_path / "cache")))
    done = sweep(toml, tmp_path / "out", "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["run"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert list(rows) == ["student", "fm", "broken", "orphan"]  # the file's order
    assert (rows["fm"]["sampler"], rows["fm"]["steps"], rows["fm"]["train_step"]) == ("euler", 2, 3)
    assert (rows["student"]["sampler"], rows["student"]["steps"], rows["student"]["train_step"]) == (
        "segment",
        2,
        2,
    )
    assert rows["broken"]["error"].startswith("train exited 2")
    assert rows["orphan"]["error"] == "teacher broken did not finish training"
    student = json.loads((tmp_path / "out" / "student" / "config.json").read_text())
    assert student["objective"]["name"] == "mlcd"
    assert student["objective"]["options"]["teacher"] == str((tmp_path / "out" / "fm").resolve())
    # --collect: the tables again from the eval reports alone, nothing trained or evaluated
    (tmp_path / "out" / "results.json").unlink()
    collected = sweep(toml, tmp_path / "out", "--collect")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    again = {row["run"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert again["fm"]["fvd"] == rows["fm"]["fvd"] and again["student"]["fvd"] == rows["student"]["fvd"]


def test_a_student_whose_teacher_is_not_in_the_sweep_is_refused(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text('[runs.student]\nteacher = "fm"\ndistill = "--steps 2"\n[runs.fm]\ntrain = ""\n')
    done = sweep(toml, tmp_path / "out", "--only", "student")
    assert (
        done.returncode != 0 and "teacher(s) fm are not runs of this sweep (or not in --only)" in done.stderr
    )
