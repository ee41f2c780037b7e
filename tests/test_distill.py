"""Efficient-vDiT's pipeline (eflow distill): MLCD against a hand computation, segment boundaries, the
tile search on a layer whose attention is exactly a tile mask, refused teachers, and tiny CPU runs of
every stage that `eflow sample` then reads."""

import copy
import json
import shutil

import pytest
import torch
from test_train import tiny_tree
from toy_model import ToyModel
from typer.testing import CliRunner

from eflow.cli.app import app
from eflow.condition import Condition
from eflow.config import build_config, load_run_config
from eflow.distill.capture import attention_modules
from eflow.distill.stages import STAGE_DIRS, run_pipeline, student_config
from eflow.distill.teacher import Teacher, check_compatible, check_velocity_teacher
from eflow.distill.tiles import CalibrationBatch, search_tiles, tile_candidates
from eflow.errors import ConfigError, EflowError
from eflow.model.dit import build_model
from eflow.network import DropPlan, Network
from eflow.objective import StepInfo
from eflow.registry import get_registry
from eflow.run_config import check_run_config
from eflow.run_dir import checkpoint_dirs
from eflow.timesteps import shift_time
from eflow.train.metrics import read_metrics
from eflow.train.trainer import Trainer

runner = CliRunner()


def teacher_config(out):
    """A tiny fm teacher: softmax attention, 4 latent frames of 2 x 2 tokens, dense."""
    cfg = build_config(
        tiny_tree(out, steps=3),
        {
            "objective": {"name": "fm"},
            "model": {"attention": "softmax"},
            "token_drop": {"name": "none"},
            "schedule": {"stages": [{"start": 0.0, "end": 1.0, "drop_ratio": 0.0}]},
            "data": {"frames": 4},
        },
    )
    check_run_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distill") / "teacher"
    Trainer(teacher_config(out), progress=False).run()
    yield out
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student_run(teacher_run):
    """`eflow distill` (MLCD) from the teacher: 2 segments, 2 steps."""
    out = teacher_run.parent / "student"
    args = ["distill", "--teacher", str(teacher_run), "--out", str(out), "--segments", "2", "--steps", "2"]
    result = runner.invoke(app, [*args, "--teacher-steps", "4", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def toy(seed):
    torch.manual_seed(seed)
    return ToyModel(num_classes=4, hidden=32, emb=16).double()


# ----- MLCD: the target, by hand ----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["ema", "online"])
def test_mlcd_loss_equals_a_hand_computation_in_float64(target):
    """Per sample, one network call at a time: the teacher's Euler step with CFG, the target f_sg at
    (x_t', t', s), the student's jump f(x_t, t, s); s the segment's end, t' clamped to it."""
    student, ema, teacher = toy(0), toy(1), toy(2)
    objective = get_registry("objective").create(
        "mlcd",
        options={"segments": 2, "teacher_steps": 4, "skip": 1, "w_min": 2.0, "w_max": 5.0, "target": target},
        total_steps=1,
        teacher_model=teacher,
    )
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 1, 1, 1, generator=gen, dtype=torch.float64)
    cond = Condition(labels=torch.tensor([0, 1, 2, 3]))
    draws = objective.draw(x0, gen)
    draws.x1 = draws.x1.double()
    draws.j = torch.tensor([1, 2, 3, 4])
    draws.w = torch.tensor([2.0, 3.0, 4.5, 5.0], dtype=torch.float64)
    out = objective.loss_from(Network(student, ema), x0, cond, draws)

    grid = [3 * (j / 4) / (1 + 2 * (j / 4)) for j in range(5)]  # shift_time(j / N, 3)
    segment_end = [0, 0, 2, 2]  # j = 1, 2 -> segment [t_0, t_2]; j = 3, 4 -> [t_2, t_4]
    step_end = [0, 1, 2, 3]  # max(j - skip, segment end)
    target_net = ema if target == "ema" else student
    losses = []
    with torch.no_grad():
        for i in range(4):
            one = lambda v: torch.full((1,), float(v), dtype=torch.float64)  # noqa: E731
            t, tp, s = one(grid[i + 1]), one(grid[step_end[i]]), one(grid[segment_end[i]])
            w, c = one(draws.w[i]), cond[i : i + 1]
            x_t = (1 - t) * x0[i : i + 1] + t * draws.x1[i : i + 1]
            v_c = teacher(x_t, t, t, c, one(0))
            v_u = teacher(x_t, t, t, c.null(), one(0))
            x_tp = x_t + (tp - t) * (v_u + w * (v_c - v_u))
            f_target = x_tp + (s - tp) * target_net(x_tp, tp, s, c, w)
            f_pred = x_t + (s - t) * student(x_t, t, s, c, w)
            losses.append(((f_pred - f_target) ** 2).mean())
    expected = torch.stack(losses).mean()
    assert torch.allclose(out.loss.detach(), expected, rtol=1e-12, atol=1e-15)
    assert out.metrics["at_boundary"] == 0.5  # j = 1 and j = 3 step onto their segment's end
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in ema.parameters()) and all(p.grad is None for p in teacher.parameters())


def test_segment_boundaries_are_grid_points_and_the_segment_sampler_visits_them():
    mlcd = get_registry("objective").create(
        "mlcd", options={"segments": 4, "teacher_steps": 8, "skip": 3}, total_steps=1
    )
    b = mlcd.boundaries()
    assert torch.allclose(b, shift_time(torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64), 3.0))
    from eflow.plugins.objectives.mlcd import segment_times

    j = torch.arange(1, 9)
    t, t_prev, s = segment_times(j, 8, 4, 3, 3.0)
    grid = shift_time(torch.arange(9, dtype=torch.float64) / 8, 3.0)
    assert torch.equal(s, b[(j - 1) // 2])  # two grid steps per segment; s = the segment's lower end
    assert torch.equal(t, grid[j])
    assert torch.equal(t_prev, grid[torch.maximum(j - 3, (j - 1) // 2 * 2)])  # a long step stops at s
    assert (s < t).all() and (t_prev >= s).all() and (t_prev < t).all()

    visited = []

    def model(x, t, s, cond, w, path="full"):
        visited.append((float(t[0]), float(s[0]), float(w[0])))
        return torch.zeros_like(x)

    sampler = get_registry("sampler").create("segment", options={"shift": 3.0})
    x = torch.randn(2, 3, 2, 4, 4)
    out = sampler.sample(model, x, Condition(labels=torch.tensor([0, 1])), 4, 4.0)
    assert torch.equal(out, x) and sampler.last_nfe == 4  # F = 0: every jump keeps x
    ends = b.flip(0).float().tolist()
    assert visited == [(pytest.approx(ends[k]), pytest.approx(ends[k + 1]), 4.0) for k in range(4)]


def test_the_target_at_a_segment_end_is_the_teacher_step_itself():
    """The boundary condition f(x, s, s) = x: at t' = s the target ignores the target network."""
    student, teacher = toy(0), toy(2)
    mlcd = get_registry("objective").create(
        "mlcd", options={"segments": 1, "teacher_steps": 2, "skip": 5}, total_steps=1, teacher_model=teacher
    )
    ema = toy(7)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(float("nan"))  # any use of the target network would show
    x0 = torch.randn(3, 2, 1, 1, 1, dtype=torch.float64)
    draws = mlcd.draw(x0)
    draws.x1, draws.w = draws.x1.double(), draws.w.double()
    out = mlcd.loss_from(Network(student, ema), x0, Condition(labels=torch.tensor([0, 1, 2])), draws)
    assert torch.isfinite(out.loss) and out.metrics["at_boundary"] == 1.0


def test_attention_distillation_of_a_copy_of_the_teacher_is_zero_and_drops_tokens():
    torch.manual_seed(0)
    teacher = build_model("tiny", attention="softmax", num_classes=8)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    student = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    objective = get_registry("objective").create("attn-distill", total_steps=1, teacher_model=teacher)
    batch = {"x0": torch.randn(2, 3, 4, 8, 8), "cond": Condition(labels=torch.tensor([1, 2]))}
    net = Network(student, copy.deepcopy(student))
    out = objective.loss(net, batch, StepInfo(step=0, total_steps=1))
    assert out.metrics["attention_mse"] == 0.0 and out.metrics["output_mse"] == 0.0
    assert net.counts["full_nograd"] == 2  # the teacher's pass is counted
    drop = DropPlan(get_registry("token_drop").create("random"), 0.5, seed=0)
    out = objective.loss(Network(student, None, drop), batch, StepInfo(step=0, total_steps=1))
    assert out.metrics["attention_mse"] > 0  # the middle blocks saw half the tokens
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ----- the tile search ----------------------------------------------------------------------------

EXACT = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 3)]  # (R, w) per block; distinct masks on 4 frames


def frame_mask(reference_frames, frame_window, frames=4):
    """Which frames each frame attends to under a tile mask (to tell apart masks that coincide)."""
    return [
        [abs(f - g) <= frame_window or g < reference_frames for g in range(frames)] for f in range(frames)
    ]


def tile_teacher():
    """A tiny model whose every layer's attention is exactly a tile mask (one per block)."""
    torch.manual_seed(0)
    options = {"reference_frames": [r for r, _ in EXACT], "frame_window": [w for _, w in EXACT]}
    model = build_model("tiny", attention="tile", attention_options=options, num_classes=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def calibration(n=2):
    gen = torch.Generator().manual_seed(1)
    return [
        CalibrationBatch(
            torch.randn(2, 3, 4, 8, 8, generator=gen),
            torch.rand(2, generator=gen),
            Condition(labels=torch.tensor([i, i + 1])),
        )
        for i in range(n)
    ]


def test_tile_search_picks_each_layers_exact_mask():
    model = tile_teacher()
    assert [(m.reference_frames, m.frame_window) for m in attention_modules(model)] == EXACT
    candidates = tile_candidates(4, max_reference=2, max_window=3)
    search = search_tiles(model, calibration(), candidates, budget=1.0)
    chosen = [(c.options["reference_frames"], c.options["frame_window"]) for c in search.choices]
    assert chosen == EXACT
    assert all(c.error == 0.0 for c in search.choices)  # the same computation, bit for bit
    others = [s for s in search.table if frame_mask(**s.options) != frame_mask(*EXACT[s.block])]
    assert min(s.error for s in others) > 1e-6  # only masks equal to the exact one reproduce it
    # the choice becomes per-block option lists that rebuild the same layers
    rebuilt = build_model(
        "tiny", attention="tile", attention_options=search.attention_options(), num_classes=8
    )
    assert [(m.reference_frames, m.frame_window) for m in attention_modules(rebuilt)] == EXACT
    # Algorithm 1's threshold picks the cheapest mask under it: r = 0 keeps the exact ones
    assert [
        c.options for c in search_tiles(model, calibration(1), candidates, budget=1, threshold=0).choices
    ] == [c.options for c in search.choices]


def test_tile_search_keeps_every_layer_within_the_budget():
    model = tile_teacher()
    search = search_tiles(model, calibration(1), tile_candidates(4, 2, 3), budget=0.5)
    assert all(c.cost <= 0.5 and not c.over_budget for c in search.choices)
    assert search.choices[5].options != {"reference_frames": 0, "frame_window": 3}  # dense costs 1
    dense_only = search_tiles(model, calibration(1), [{"reference_frames": 0, "frame_window": 3}], budget=0.5)
    assert all(c.over_budget for c in dense_only.choices)  # nothing fits: the cheapest, flagged


def test_a_per_block_tile_list_of_the_wrong_length_names_the_field():
    with pytest.raises(EflowError, match=r"model.attention_options.reference_frames lists 2 blocks"):
        build_model("tiny", attention="tile", attention_options={"reference_frames": [0, 1]}, num_classes=8)


# ----- refused teachers ---------------------------------------------------------------------------


def test_a_student_trains_dense_in_every_stage_and_keeps_the_stages_clip_sizes(tmp_path):
    stages = [
        {"start": 0.0, "end": 0.5, "drop_ratio": 0.75, "dense_every": 4, "frames": 2},
        {"start": 0.5, "end": 1.0, "mva_share": 0.25},
    ]
    base = build_config({"schedule": {"stages": stages}, "data": {"frames": 4}})
    cfg = student_config(base, tmp_path / "student", objective="fm", options={})
    got = [(s.end, s.drop_ratio, s.dense_every, s.mva_share, s.frames) for s in cfg.schedule.stages]
    assert got == [(0.5, 0.0, 0, 0.0, 2), (1.0, 0.0, 0, 0.0, None)]


def test_incompatible_teachers_are_refused_naming_the_field(teacher_run, student_run, tmp_path):
    with pytest.raises(ConfigError, match=r"objective.name = 'sfm'.*not a velocity teacher"):
        check_velocity_teacher(build_config({"objective": {"name": "sfm"}}))
    teacher = load_run_config(teacher_run)
    text = teacher.model_copy(update={"data": teacher.data.model_copy(update={"condition": "text"})})
    with pytest.raises(ConfigError, match=r"data.condition is 'label' for the teacher but 'text'"):
        check_compatible(teacher, text)
    # a distilled student is not a velocity teacher
    args = ["distill", "--teacher", str(student_run), "--out", str(tmp_path / "x"), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "objective.name = 'mlcd'" in result.output, result.output
    # another clip shape than the teacher's
    args = ["distill", "--teacher", str(teacher_run), "--out", str(tmp_path / "y"), "--set", "data.frames=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "data.frames is 4 for the teacher but 2" in result.output, result.output
    assert not (tmp_path / "y").exists()
    # latents with other channels than the teacher's
    model = build_model("tiny", attention="softmax", num_classes=8)
    with pytest.raises(ConfigError, match="the teacher's latents have 3 channels"):
        Teacher(teacher_run, teacher, model, 0).check_batch(
            torch.zeros(1, 4, 4, 8, 8), Condition(torch.zeros(1))
        )


# ----- tiny runs ----------------------------------------------------------------------------------


def test_a_distilled_student_samples_with_segment_and_a_rerun_skips(teacher_run, student_run):
    cfg = load_run_config(student_run)
    assert cfg.objective.name == "mlcd" and cfg.objective.options["teacher"] == str(teacher_run.resolve())
    assert (cfg.sample.steps, cfg.sample.sampler_options, cfg.train.ema_decay) == (2, {"shift": 3.0}, 0.95)
    assert [r["step"] for r in read_metrics(student_run / "metrics.jsonl")] == [0, 1]
    result = runner.invoke(app, ["sample", str(student_run), "--num", "2", "--device", "cpu"])
    assert result.exit_code == 0 and "'segment' (2 steps, w=4.0)" in result.output, result.output
    assert "note:" not in result.output
    # the student learned its segments, w and shift: sampling with others is allowed, with a note
    other = ["sample", str(student_run), "--num", "2", "--device", "cpu", "--steps", "3", "--guidance", "2"]
    text = " ".join(runner.invoke(app, other).output.split())
    assert "note: this mlcd run was trained for its own sampling settings" in text, text
    assert "steps 3 (trained 2), guidance 2.0 (trained 4.0)" in text, text
    text = " ".join(runner.invoke(app, [*other[:6], "--sampler", "euler"]).output.split())
    assert "sampler 'euler' is not the one mlcd runs are trained for ('segment')" in text, text
    same = ["distill", "--teacher", str(teacher_run), "--out", str(student_run), "--segments", "2"]
    same += ["--steps", "2", "--teacher-steps", "4", "--batch-size", "2", "--device", "cpu"]
    result = runner.invoke(app, same)
    assert result.exit_code == 0 and "mlcd: skipped" in result.output, result.output
    assert "kept its saved settings" not in result.output
    # a rerun asking for other settings is told that the run in the folder keeps its own
    other = ["distill", "--teacher", str(teacher_run), "--out", str(student_run), "--device", "cpu"]
    text = " ".join(runner.invoke(app, [*other, "--segments", "3", "--steps", "5"]).output.split())
    assert "mlcd: skipped" in text and "kept its saved settings, not this call's" in text, text
    assert "objective.options.segments 2 (asked 3)" in text and "train.steps 2 (asked 5)" in text, text
    assert "--resume --steps N" in text


def test_the_pipeline_runs_its_stages_in_order_and_resumes(teacher_run, tmp_path):
    kwargs = {
        "tiles": {"clips": 2, "max_window": 3},
        "attention": {"steps": 2},
        "mlcd": {"segments": 2, "steps": 2, "options": {"teacher_steps": 4}},
        "train": {"batch_size": 2, "device": "cpu"},
        "progress": False,
    }
    out = tmp_path / "pipe"
    results = run_pipeline(teacher_run, out, **kwargs)
    assert [(r.stage, r.status) for r in results] == [
        ("tiles", "searched"),
        ("attention", "trained"),
        ("mlcd", "trained"),
    ]
    tiles = json.loads((out / STAGE_DIRS["tiles"] / "tiles.json").read_text())
    assert len(tiles["choices"]) == 6 and all(c["cost"] <= 0.5 for c in tiles["choices"])
    final = load_run_config(out / STAGE_DIRS["mlcd"])
    assert final.model.attention == "tile" and len(final.model.attention_options["frame_window"]) == 6
    assert load_run_config(out / STAGE_DIRS["attention"]).objective.name == "attn-distill"
    # every stage starts from the previous one's EMA weights: MLCD's step-0 checkpoint holds them
    from safetensors.torch import load_file

    previous = load_file(str(checkpoint_dirs(out / STAGE_DIRS["attention"])[-1] / "ema.safetensors"))
    start = load_file(str(checkpoint_dirs(out / STAGE_DIRS["mlcd"])[0] / "model.safetensors"))
    assert all(torch.equal(previous[k], start[k]) for k in start)

    assert [r.status for r in run_pipeline(teacher_run, out, **kwargs)] == ["skipped"] * 3
    shutil.rmtree(checkpoint_dirs(out / STAGE_DIRS["mlcd"])[-1])  # as if stopped before its last save
    assert [r.status for r in run_pipeline(teacher_run, out, **kwargs)] == ["skipped", "skipped", "continued"]
