"""Ulysses sequence parallelism (eflow.parallel.sequence): over 2 gloo processes the tiny VideoDiT gives
the outputs and, averaged over the sp group, the gradients of one process, for every backend that runs
under it, dense and with dropped tokens, with token counts that 2 does not divide; what it cannot run
is refused by name.

Run as a script under torchrun, this file is the 2-process worker of the parity test."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from off_init import perturb

from eflow.condition import Condition
from eflow.config import build_config
from eflow.errors import ConfigError, EflowError
from eflow.model.dit import build_model
from eflow.parallel.config import ParallelSection
from eflow.parallel.parallelize import parallelize
from eflow.parallel.sequence import data_parallel_world
from eflow.run_config import check_run_config
from eflow.train.distributed import World

CPU = torch.device("cpu")

# name -> (attention, options, [parallel] table, text-conditioned): every backend that runs under SP
CASES = {
    "softmax": ("softmax", {}, {}, False),
    "glga": ("glga", {}, {}, False),
    "glga-gate-per-head": ("glga", {"gate_per_head": True}, {}, False),
    "glga-ac-full": ("glga", {}, {"ac": "full"}, False),
    "sla": ("sla", {"block_q": 4, "block_k": 4, "sparsity": 0.5}, {}, False),
    "vsa": ("vsa", {"tile": (1, 2, 2), "sparsity": 0.5}, {}, False),
    "tile": ("tile", {"reference_frames": 1, "frame_window": 0}, {}, False),
    "softmax-text": ("softmax", {}, {}, True),
}
COMPILED = {"glga-compiled": ("glga", {}, {"compile": True}, False)}  # a slow test of its own


# ----- in one process --------------------------------------------------------------------------------
def test_collective_outputs_hand_their_gradient_back_contiguous():
    """A functional collective's backward runs the reverse collective on its output's gradient, and NCCL
    refuses a non-contiguous one (gloo, which the other tests use, accepts it): the permutes after the
    all-to-alls must not reach it. Control first: a plain permute hands back a non-contiguous gradient."""
    from eflow.parallel.sequence import _ContiguousGrad

    def gradient_reaching(wrap) -> torch.Tensor:
        collective_output = torch.randn(2, 3, 4, requires_grad=True) * 1.0  # stands for wait_tensor(...)
        seen = []
        collective_output.register_hook(seen.append)
        wrap(collective_output).permute(2, 0, 1).mul(torch.randn(4, 2, 3)).sum().backward()
        return seen[0]

    assert not gradient_reaching(lambda x: x).is_contiguous()
    grad = gradient_reaching(_ContiguousGrad.apply)
    assert grad.is_contiguous()
    assert grad.shape == (2, 3, 4)


def test_sp_is_off_by_default_and_parallelize_leaves_the_model_alone_with_sp_1():
    assert ParallelSection().sp == 1
    assert build_config({"parallel": {"sp": 2}}).parallel.sp == 2
    with pytest.raises(ConfigError, match=r"parallel\.sp"):
        build_config({"parallel": {"sp": 0}})
    model = build_model("tiny")
    parallelize(model, ParallelSection(sp=1), World(), CPU)
    assert all("forward" not in vars(block) and "forward" not in vars(block.attn) for block in model.blocks())


def test_heads_that_sp_does_not_divide_are_refused_naming_sp_heads_and_preset():
    cfg = build_config({"parallel": {"sp": 2}, "model": {"preset": "tiny", "overrides": {"heads": 3}}})
    with pytest.raises(ConfigError, match=r"parallel\.sp = 2 must divide.*preset 'tiny'.* 3 heads"):
        check_run_config(cfg)
    check_run_config(build_config({"parallel": {"sp": 4}, "model": {"preset": "tiny"}}))  # 4 heads: fine
    model = build_model("tiny", overrides={"heads": 3})
    with pytest.raises(ConfigError, match=r"parallel\.sp = 2 must divide the attention heads.* 3 heads"):
        parallelize(model, ParallelSection(sp=2), World(0, 2, 0), CPU)


def test_sana_is_refused_because_its_mix_ffn_reads_neighbouring_tokens():
    model = build_model("tiny", attention="sana")
    with pytest.raises(ConfigError, match=r"attention 'sana'.*MixFFN.*parallel\.sp = 1"):
        parallelize(model, ParallelSection(sp=2), World(0, 2, 0), CPU)


def test_sp_must_divide_the_processes():
    with pytest.raises(ConfigError, match=r"parallel\.sp = 2 must divide the number of processes \(3\)"):
        parallelize(build_model("tiny"), ParallelSection(sp=2), World(0, 3, 0), CPU)


def test_the_ranks_of_a_group_share_one_data_parallel_rank():
    """A (dp, sp) = (3, 2) job: ranks 0, 1 are data replica 0, ranks 2, 3 replica 1, ranks 4, 5 replica 2."""
    assert [data_parallel_world(World(r, 6, r % 2), 2) for r in range(6)] == [
        World(r // 2, 3, r % 2) for r in range(6)
    ]
    assert data_parallel_world(World(), 1) == World()


# ----- over 2 gloo processes -------------------------------------------------------------------------
def inputs(text: bool, rank_offset: float = 0.0):
    """Two clips on a 3 x 3 x 3 token grid (27 tokens), 13 of them kept, and two on 2 x 2 x 2 (8)."""
    g = torch.Generator().manual_seed(5)
    x27 = torch.randn(2, 3, 3, 12, 12, generator=g) + rank_offset
    x8 = torch.randn(2, 3, 2, 8, 8, generator=g)
    t = torch.rand(2, generator=g)
    keep = torch.stack([torch.randperm(27, generator=g)[:13].sort().values for _ in range(2)])
    if text:
        cond = Condition(
            text=torch.randn(2, 5, 16, generator=g), text_mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
        )
    else:
        cond = Condition(labels=torch.tensor([1, 2]))
    return x27, x8, t, keep, cond


def forward_backward(model, text: bool):
    """Outputs of a pass with 13 of 27 tokens kept, a dense pass on 8 tokens and a weak pass, and the
    parameters' gradients of one loss over them (the local ones, before any averaging)."""
    x27, x8, t, keep, cond = inputs(text)
    model.zero_grad(set_to_none=True)
    outs = [
        model(x27, t, 0.5 * t, cond, 3.0, keep=keep),
        model(x8, t, 0.25 * t, cond, 1.0),
        model(x27, t, t, cond, 0.0, path="weak"),
    ]
    sum((i + 1) * out.square().mean() for i, out in enumerate(outs)).backward()
    return outs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tiny_model(attention: str, options: dict, text: bool):
    """The tiny preset with every parameter moved off its (partly zero) initialization, the same on
    every rank, so every path of every block shows in the outputs and gradients."""
    torch.manual_seed(0)
    kwargs = {"text_dim": 16} if text else {}
    model = build_model("tiny", attention=attention, attention_options=options, **kwargs)
    # 0.05 (tests/off_init.py): with 0.2 the activations reach ~2,000, and on some CPUs fp32 rounding
    # alone then moved softmax's middle.3 norm_q gradient past rtol 1e-5 between sp = 2 and one process
    return perturb(model)


def assert_matches(got, want, msg: str, rtol: float = 1e-5) -> None:
    """Equal up to fp32 rounding: within rtol, or rtol / 10 of the tensor's largest entry (entries near
    zero of a large gradient carry that tensor's rounding)."""
    atol = 0.1 * rtol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=msg)


def fsdp_reduces_like_the_sequence_average(world: World, mesh) -> None:
    """FSDP2 over the same 2 ranks (gathered once per step) averages the gradients over all ranks, which
    for a (1, 2) mesh is the sp average: its reduced shards are one process's gradients."""
    from eflow.parallel.fsdp import ShardedStep

    reference = tiny_model("glga", {}, False)
    model = parallelize(copy.deepcopy(reference), ParallelSection(sp=2, fsdp=True), world, CPU, mesh=mesh)
    step = ShardedStep(model, reshard_after_forward=False)
    expected, expected_grads = forward_backward(reference, False)
    step.begin_step()
    outs, _ = forward_backward(model, False)
    step.reduce_gradients()
    for got, want in zip(outs, expected, strict=True):
        assert_matches(got, want, "fsdp: outputs")
    for name, param in model.named_parameters():
        assert_matches(param.grad.full_tensor(), expected_grads[name], f"fsdp: gradient of {name}")


def parity_worker(out: Path, cases: list[str]) -> None:
    """One rank of the parity tests (torchrun sets RANK, WORLD_SIZE): `cases` of CASES, then (all of
    CASES) the refusal of inputs that differ between the ranks."""
    from eflow.parallel.sequence import average_sequence_gradients, sequence_mesh

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    world = World(rank, 2, rank)
    mesh = sequence_mesh(world, 2, "cpu")
    report = {}
    for case in cases:
        attention, options, parallel, text = {**CASES, **COMPILED}[case]
        rtol = 2e-4 if parallel.get("compile") else 1e-5  # Inductor's fusions round differently
        reference = tiny_model(attention, options, text)
        model = parallelize(
            copy.deepcopy(reference), ParallelSection(sp=2, **parallel), world, CPU, mesh=mesh
        )
        expected, expected_grads = forward_backward(reference, text)
        outs, local = forward_backward(model, text)
        for got, want in zip(outs, expected, strict=True):
            assert_matches(got, want, f"{case}: outputs", rtol)
        assert local.keys() == expected_grads.keys(), case
        partial = [n for n, g in local.items() if not torch.allclose(g, expected_grads[n], rtol=1e-3)]
        assert partial, f"{case}: the local gradients are already the whole ones: the test proves nothing"
        average_sequence_gradients(model, mesh)
        for name, param in model.named_parameters():
            assert_matches(param.grad, expected_grads[name], f"{case}: gradient of {name}", rtol)
        with torch.no_grad():  # as the EMA's and the samplers' passes run
            x27, _, t, keep, cond = inputs(text)
            want = reference(x27, t, t, cond, 2.0, keep=keep)
            assert_matches(model(x27, t, t, cond, 2.0, keep=keep), want, f"{case}: without grad", rtol)
        assert list(model.state_dict()) == list(reference.state_dict())
        report[case] = {"partial_gradients": len(partial), "gradients": len(local)}

    if set(cases) == set(CASES):
        fsdp_reduces_like_the_sequence_average(world, mesh)
        report["fsdp"] = "ok"
        model = parallelize(tiny_model("glga", {}, False), ParallelSection(sp=2), world, CPU, mesh=mesh)
        x27, _, t, _, cond = inputs(False, rank_offset=float(rank))
        try:
            model(x27, t, t, cond)
        except EflowError as err:
            report["different_inputs"] = str(err)
    (out / f"report_{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def run_two_ranks(out: Path, cases: list[str]) -> None:
    """Both ranks under torchrun, each one's output in its own log file: a failure shows every rank's
    end (a rank that dies first, e.g. aborting, is the cause; the other's connection error follows)."""
    logs = out / "torchrun_logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "--log-dir", str(logs), "--redirects", "3", __file__, str(out), ",".join(cases),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        ends = [
            f"--- {log.relative_to(logs)}:\n{log.read_text()[-2500:]}" for log in sorted(logs.rglob("*.log"))
        ]
        raise AssertionError("\n".join([proc.stderr[-2000:], *ends]))


@pytest.mark.slow
def test_sp_2_matches_one_process_for_every_backend_it_runs(tmp_path):
    """torchrun, 2 gloo processes, fp32: for softmax, glga (shared and per-head gates, and under full
    activation checkpointing), sla, vsa, tile and a text-conditioned softmax model, sp = 2 gives one
    process's outputs on 27 tokens with 13 kept (neither divisible by 2), on 8 dense tokens and on the
    weak path, with and without grad; each rank's own gradients are partial and their mean over the sp
    group is one process's gradient; ranks fed different inputs are refused."""
    run_two_ranks(tmp_path, list(CASES))
    for rank in range(2):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        assert set(CASES) <= set(report), report
        assert "got different inputs" in report["different_inputs"]
        assert "data_parallel_world" in report["different_inputs"]
        assert report["fsdp"] == "ok"


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="Inductor needs a C++ compiler on the CPU (the GPU runs it)",
)
def test_sp_2_with_compiled_blocks_matches_one_process(tmp_path):
    """parallel.compile with sp = 2 (the collectives run eagerly between the compiled pieces): GLGA's
    outputs and averaged gradients are one eager process's, within compile's rounding. A minute or
    more on 2 cores (compiling)."""
    run_two_ranks(tmp_path, ["glga-compiled"])
    assert "glga-compiled" in json.loads((tmp_path / "report_0.json").read_text())


if __name__ == "__main__":  # a rank of the two tests above
    parity_worker(Path(sys.argv[1]), sys.argv[2].split(","))
