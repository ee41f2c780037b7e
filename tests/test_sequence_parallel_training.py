"""`eflow train --sp 2` under torchrun trains like one process: the two ranks of the sequence-parallel
group share one batch and its draws (eflow.parallel.sequence.data_parallel_world), split its tokens, and
end every step with the one-process gradients, so the losses and weights follow the one-process run.

Run as a script under torchrun, this file is the 2-process worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from off_init import mean_output, start_runs_off_init
from sequence_counting import count_sequence_all_to_alls
from test_train import losses, tiny_config

from eflow.parallel.config import ParallelSection
from eflow.run_dir import checkpoint_dirs
from eflow.train import checkpoint
from eflow.train.trainer import Trainer


def config(out: Path, sp: int):
    """The EFlow recipe (pdg-sfm + MVA, sprint drop then dense with MVA) on the tiny preset, 4 steps."""
    cfg = tiny_config(out, steps=4, save_every=4, threads=1)
    cfg.objective.options = {"mva": True}
    cfg.parallel = ParallelSection(sp=sp)
    return cfg


@pytest.mark.slow
def test_sp_2_under_torchrun_trains_like_one_process(tmp_path, monkeypatch):
    """torchrun, 2 gloo processes, sp = 2 (one data-parallel replica): the losses of every step and the
    final weights equal a one-process run's at fp32 rounding (the all-to-alls reorder no sum, but the
    gradient average over the group does). Both start off the model's initialization: from AdaLN-Zero's
    start, scaling every attention output by 0.8 moved these losses by 2e-7 relative, within rel=1e-5
    (off it, by 2e-5 to 5e-5)."""
    start_runs_off_init(monkeypatch)
    Trainer(config(tmp_path / "one", sp=1), progress=False).run()
    assert mean_output(tmp_path / "one", "model") > 0.1  # off init (~0.02 from init)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(tmp_path / "sp2")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(losses(tmp_path / "one")) == 4
    for rank in range(2):  # the model really ran split: one all-to-all per attention call
        assert int((tmp_path / "sp2" / f"all_to_alls_{rank}.txt").read_text()) > 0
    assert losses(tmp_path / "sp2") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, sp2 = (
        checkpoint.read_weights(checkpoint_dirs(tmp_path / r)[-1], "model")[0] for r in ("one", "sp2")
    )
    assert one.keys() == sp2.keys()
    for name in one:
        # atol to the tensor's scale: AdamW divides by sqrt(v) + eps, so an element whose gradient is near
        # eps moves with the gradient's fp32 rounding (a reordered sum), by up to ~6e-5 of the tensor's
        # largest entry after 4 steps; a one-process run on 2 threads differs from one on 1 as much,
        # while scaling every attention output by 0.8 moves the weights by ~5e-3
        atol = 3e-4 * one[name].abs().max().item()
        torch.testing.assert_close(sp2[name], one[name], rtol=1e-4, atol=atol, msg=name)


def sp_worker(out: Path) -> None:
    """One rank: train with sp = 2, counting the sequence-to-heads all-to-alls the model makes."""

    calls = count_sequence_all_to_alls()
    start_runs_off_init()  # as the one-process run
    Trainer(config(out, sp=2), progress=False).run()
    (out / f"all_to_alls_{os.environ['RANK']}.txt").write_text(str(len(calls)))


if __name__ == "__main__":  # a rank of test_sp_2_under_torchrun_trains_like_one_process
    sp_worker(Path(sys.argv[1]))
