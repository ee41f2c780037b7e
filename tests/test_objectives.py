"""Objectives fm, sfm, pdg-sfm (+ MVA): hand-computed losses, stop-gradients, PDG paths, costs, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_model import ToyModel

from eflow.condition import NULL_LABEL, Condition
from eflow.errors import ConfigError
from eflow.network import Network, solution_map
from eflow.objective import ForwardCost, StepInfo
from eflow.plugins.objectives import fm as fm_module
from eflow.plugins.objectives import solution_flow as sf_module
from eflow.plugins.objectives.fm import FMDraws
from eflow.plugins.objectives.solution_flow import SFMDraws, SolutionFlow, group_sizes, scm_loss
from eflow.registry import Registry, get_registry
from eflow.timesteps import mva_grid


def objectives() -> Registry:
    reg = Registry("objective")
    fm_module.register_objectives(reg.register)
    sf_module.register_objectives(reg.register)
    return reg


def make(name: str, total_steps: int = 100, **options):
    return objectives().create(name, options=options, total_steps=total_steps)


def labels_cond(labels) -> Condition:
    return Condition(labels=torch.as_tensor(labels, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# an affine model whose F is easy to write down by hand


class Affine(nn.Module):
    """F_full = scale (0.5 x + t - 2 s + 0.1 g + 0.3 label) (null label -> -0.5); F_weak = scale (t - x)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x, t, s, cond, guidance=None, path="full", keep=None):
        return hand_F(x, t, s, cond.labels, guidance, path, self.scale)


def hand_F(x, t, s, labels, g, path, scale):
    e = lambda v: v.view(-1, 1, 1, 1, 1).to(x.dtype)  # noqa: E731
    if path == "weak":
        return scale * (e(t) - x)
    offset = torch.where(labels == NULL_LABEL, -0.5, 0.3 * labels.to(x.dtype))
    g = torch.zeros_like(t) if g is None else g
    return scale * (0.5 * x + e(t) - 2 * e(s) + 0.1 * e(g) + e(offset))


def one(v) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=torch.float64)


def F1(x, t, s, label, g, path, scale):
    """hand_F for one sample x [1, 2, 1, 1, 1] at scalar times."""
    return hand_F(x, one(t), one(s), torch.tensor([label]), one(g), path, scale)


def mse(a, b):
    return ((a - b) ** 2).mean()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    x1 = torch.randn(4, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    return x0, x1, labels_cond([1, 2, 3, 0])


# ----------------------------------------------------------------------------------------------------
# registration and options


def test_objectives_register_with_their_default_samplers():
    reg = objectives()
    assert reg.names() == ["fm", "pdg-sfm", "sfm"]
    assert reg.get("fm").capability("default_sampler") == "euler"
    assert {reg.get(n).capability("default_sampler") for n in ("sfm", "pdg-sfm")} == {"solution"}
    assert make("pdg-sfm").pdg and not make("sfm").pdg


def test_installed_plugin_manager_finds_the_objectives():
    reg = get_registry("objective")
    assert {"fm", "sfm", "pdg-sfm"} <= set(reg.names())


def test_ratios_over_one_fail_naming_both_fields():
    with pytest.raises(ConfigError, match=r"fm_ratio \+ scm_ratio must be <= 1 \(got 0.8 \+ 0.3\)"):
        make("pdg-sfm", fm_ratio=0.8, scm_ratio=0.3)
    with pytest.raises(ConfigError, match="fm_ratio"):
        SolutionFlow(total_steps=10, fm_ratio=0.8, scm_ratio=0.3)


def test_mva_for_fm_fails_naming_the_field_and_where_it_belongs():
    with pytest.raises(ConfigError, match=r"mva: not an option of objective 'fm'.*pdg-sfm"):
        make("fm", mva=True)


def test_unknown_or_misplaced_options_fail_naming_the_field():
    with pytest.raises(ConfigError, match="fm_ration: unknown field; valid fields: fm_ratio"):
        make("sfm", fm_ration=0.5)
    with pytest.raises(ConfigError, match="p_drop: unknown field"):
        make("sfm", p_drop=0.2)  # sfm drops labels (label_dropout); p_drop is pdg-sfm's
    with pytest.raises(ConfigError, match="w_min must be <= w_max"):
        make("pdg-sfm", w_min=5.0, w_max=4.0)
    with pytest.raises(ConfigError, match="mva_share must be in"):
        make("sfm", mva=True).shares(1.0)


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("fm", {"sigma_t": -1.0}, "sigma_t"),
        ("sfm", {"r1": 0.0}, "r1"),
        ("pdg-sfm", {"nope": 1}, "nope"),
        ("mlcd", {"segments": 0}, "segments"),
        ("attn-distill", {"teacher_weights": "best"}, "teacher_weights"),
    ],
)
def test_every_objective_reports_bad_options_as_one_config_error_naming_itself_and_the_field(
    name, options, field
):
    """The objectives validate their options through eflow.api.validated_options: one ConfigError, the
    objective named as the registry names it, one line per field."""
    with pytest.raises(ConfigError) as err:
        get_registry("objective").get(name).factory(total_steps=10, **options)
    assert str(err.value).startswith(f"invalid objective '{name}' options:\n  {field}: ")


# ----------------------------------------------------------------------------------------------------
# the solution map and Lemma 1


@pytest.mark.parametrize("name", ["fm", "sfm", "pdg-sfm"])
@pytest.mark.parametrize("target", ["online", "sg", "ema"])
@pytest.mark.parametrize("path", ["full", "weak"])
def test_solution_map_is_exactly_the_identity_when_s_equals_t(name, target, path):
    torch.manual_seed(0)
    net = Network(ToyModel(hidden=16), ema=ToyModel(hidden=16))
    make(name)  # every objective drives this same wrapper
    x, t = torch.randn(8, 2, 1, 1, 1), torch.rand(8)
    f = net.solution(x, t, t, labels_cond([0, 1, 2, 3] * 2), torch.full((8,), 3.0), path=path, target=target)
    assert torch.equal(f, x)


def test_mva_residual_through_mean_velocities_equals_the_semigroup_defect():
    """EFlow Lemma 1 on a random network in float64."""
    torch.manual_seed(1)
    net = Network(ToyModel(hidden=32).double())
    cond, g = labels_cond([0, 1, 2, 3, 0, 1]), torch.full((6,), 2.0, dtype=torch.float64)
    x_t = torch.randn(6, 2, 1, 1, 1, dtype=torch.float64)
    t, l, s = (
        torch.tensor(v, dtype=torch.float64)
        for v in (
            [1.0, 0.9, 0.7, 0.5, 0.3, 0.99],
            [0.6, 0.5, 0.4, 0.2, 0.1, 0.01],
            [0.0, 0.1, 0.2, 0.1, 0.05, 0.0],
        )
    )
    with torch.no_grad():
        f = lambda x, a, b: net.solution(x, a, b, cond, g)  # noqa: E731
        u = lambda x, a, b: (x - f(x, a, b)) / (a - b).view(-1, 1, 1, 1, 1)  # noqa: E731
        x_l = f(x_t, t, l)
        gap = lambda a, b: (a - b).view(-1, 1, 1, 1, 1)  # noqa: E731
        residual = gap(t, s) * u(x_t, t, s) - gap(t, l) * u(x_t, t, l) - gap(l, s) * u(x_l, l, s)
        defect = f(x_l, l, s) - f(x_t, t, s)
    assert torch.allclose(residual, defect, atol=1e-12, rtol=0)
    assert defect.abs().max() > 1e-3  # a random network is far from a semigroup: the check is not vacuous


# ----------------------------------------------------------------------------------------------------
# losses against hand computation


@pytest.mark.parametrize("adaptive", [False, True])
def test_fm_loss_equals_hand_computed_value(data, adaptive):
    x0, x1, cond = data
    obj = make("fm", adaptive_weight=adaptive, p=0.75, eps=0.02)
    model = Affine()
    t = torch.tensor([0.9, 0.5, 0.2, 0.7], dtype=torch.float64)
    dropped = torch.tensor([False, True, False, False])
    out = obj.loss_from(Network(model), x0, cond, FMDraws(x1, t, dropped))
    expected = 0.0
    for i in range(4):
        x_t = (1 - t[i]) * x0[i : i + 1] + t[i] * x1[i : i + 1]
        label = NULL_LABEL if dropped[i] else int(cond.labels[i])
        e = mse(F1(x_t, t[i], t[i], label, 0.0, "full", model.scale), x1[i : i + 1] - x0[i : i + 1])
        expected = expected + (e / (e.detach() + 0.02) ** 0.75 if adaptive else e) / 4
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (g_out,) = torch.autograd.grad(out.loss, model.scale)
    (g_hand,) = torch.autograd.grad(expected, model.scale)
    assert g_out.item() == pytest.approx(g_hand.item(), rel=1e-10)


def test_scm_weight_is_one_over_gaps_times_adaptive_weight_of_finite_difference():
    f_t = torch.full((1, 2, 1, 1, 1), 0.3, dtype=torch.float64)
    f_l = torch.full((1, 2, 1, 1, 1), 0.1, dtype=torch.float64)
    t, l, s = one(0.9), one(0.85), one(0.1)
    e = 0.2**2
    expected = e / (0.05 * 0.8) / (e / 0.05**2 + 0.01) ** 1.0
    assert scm_loss(f_t, f_l, t, l, s, 1.0, 0.01).item() == pytest.approx(expected, rel=1e-12)
    # not 1 / (t - l)^2: that would be e / 0.05^2 / (...), 16x larger here
    assert scm_loss(f_t, f_l, t, l, s, 1.0, 0.01).item() != pytest.approx(e / 0.05**2 / (e / 0.05**2 + 0.01))


@pytest.mark.parametrize("pdg", [False, True])
def test_solution_flow_loss_equals_hand_computed_fm_scm_and_mva_terms(data, pdg):
    """Four samples: FM (t = 0.9, in the CFG decay), FM dropped, SCM (0.7 > 0.6 > 0.2), MVA (1 > 0.5 > 0)."""
    x0, x1, cond = data
    p, eps, w, mix = 0.75, 0.02, 3.0, 0.25
    obj = SolutionFlow(total_steps=100, pdg=pdg, p=p, eps=eps, mva=True)
    model = Affine()
    draws = SFMDraws(
        x1=x1,
        fm=torch.tensor([0, 1]),
        scm=torch.tensor([2]),
        mva=torch.tensor([3]),
        t=torch.tensor([0.9, 0.5, 0.7, 1.0], dtype=torch.float64),
        l=torch.tensor([0.9, 0.5, 0.6, 0.5], dtype=torch.float64),
        s=torch.tensor([0.9, 0.5, 0.2, 0.0], dtype=torch.float64),
        w=w,
        dropped=torch.tensor([False, True, False, False]),
    )
    out = obj.loss_from(Network(model), x0, cond, draws)

    k = model.scale  # predictions carry the gradient; every target is built from the detached scale
    sg = k.detach()
    uncond_path = "weak" if pdg else "full"

    def sample(i):
        t = float(draws.t[i])
        x_t = (1 - t) * x0[i : i + 1] + t * x1[i : i + 1]
        return x_t, x1[i : i + 1] - x0[i : i + 1], int(cond.labels[i]), t

    def adaptive(e):
        return 1 / (e.detach() + eps) ** p

    # sample 0: guided FM with d(0.9) = 0.5, regressing the mixed target (SoFlow: the pass's own detached F)
    x_t, v, c, t = sample(0)
    v_g = v + 0.5 * (w - 1) * (v - F1(x_t, t, t, NULL_LABEL, 0.0, uncond_path, sg))
    v_fm = mix * v_g + (1 - mix) * F1(x_t, t, t, c, w, "full", sg)
    e = mse(F1(x_t, t, t, c, w, "full", k), v_fm)
    loss0 = adaptive(e) * e
    # sample 1: dropped -> null condition, guidance 0, plain v (weak path for pdg-sfm)
    x_t, v, c, t = sample(1)
    e = mse(F1(x_t, t, t, NULL_LABEL, 0.0, "weak" if pdg else "full", k), v)
    loss1 = adaptive(e) * e
    # sample 2: SCM, t = 0.7 > l = 0.6 > s = 0.2 (d = 1)
    x_t, v, c, t = sample(2)
    l, s = 0.6, 0.2
    v_g = v + (w - 1) * (v - F1(x_t, t, t, NULL_LABEL, 0.0, uncond_path, sg))
    v_mix = mix * v_g + (1 - mix) * F1(x_t, t, t, c, w, "full", sg)
    x_l = x_t + (l - t) * v_mix
    f_l = x_l + (s - l) * F1(x_l, l, s, c, w, "full", sg)
    f_t = x_t + (s - t) * F1(x_t, t, s, c, w, "full", k)
    e = mse(f_t, f_l)
    loss2 = e / ((t - l) * (t - s)) / (e.detach() / (t - l) ** 2 + eps) ** p
    # sample 3: MVA, t = 1 > l = 0.5 > s = 0
    x_t, v, c, t = sample(3)
    l, s = 0.5, 0.0
    x_m = x_t + (l - t) * F1(x_t, t, l, c, w, "full", sg)
    f_composed = x_m + (s - l) * F1(x_m, l, s, c, w, "full", sg)
    loss3 = mse(x_t + (s - t) * F1(x_t, t, s, c, w, "full", k), f_composed)

    expected = (loss0 + loss1 + loss2 + loss3) / 4
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert float(out.metrics["loss_fm"]) == pytest.approx(((loss0 + loss1) / 2).item(), rel=1e-12)
    assert float(out.metrics["loss_scm"]) == pytest.approx(loss2.item(), rel=1e-12)
    assert float(out.metrics["loss_mva"]) == pytest.approx(loss3.item(), rel=1e-12)
    assert (out.metrics["n_fm"], out.metrics["n_scm"], out.metrics["n_mva"], out.metrics["w"]) == (2, 1, 1, w)
    # gradients flow only through the predictions (stop-gradient targets)
    (g_out,) = torch.autograd.grad(out.loss, k)
    (g_hand,) = torch.autograd.grad(expected, k)
    assert g_out.item() == pytest.approx(g_hand.item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# the batch split and draws


def test_shares_rescale_fm_and_scm_to_fill_what_mva_leaves():
    obj = make("pdg-sfm", mva=True)
    assert obj.shares(0.0) == (0.75, 0.25, 0.0)
    assert obj.shares(0.25) == pytest.approx((0.5625, 0.1875, 0.25))
    assert make("pdg-sfm").shares(0.25) == (0.75, 0.25, 0.0)  # option mva off: no MVA group
    assert make("sfm", fm_ratio=0.6, scm_ratio=0.2).shares(0.0) == pytest.approx((0.75, 0.25, 0.0))
    for b in (1, 7, 13, 256):
        assert sum(group_sizes(b, obj.shares(0.25))) == b


def test_draws_split_the_batch_into_disjoint_groups_with_their_own_times():
    obj = make("pdg-sfm", mva=True)
    x0 = torch.zeros(64, 2, 1, 1, 1)
    d = obj.draw(x0, StepInfo(10, 100, mva_share=0.25), torch.Generator().manual_seed(0))
    assert (len(d.fm), len(d.scm), len(d.mva)) == (36, 12, 16)
    assert torch.equal(torch.cat([d.fm, d.scm, d.mva]).sort().values, torch.arange(64))
    assert torch.equal(d.s[d.fm], d.t[d.fm]) and torch.equal(d.l[d.fm], d.t[d.fm])
    assert (d.s[d.scm] <= d.l[d.scm]).all() and (d.l[d.scm] < d.t[d.scm]).all()
    grid = mva_grid()
    assert (d.s[d.mva] < d.l[d.mva]).all() and (d.l[d.mva] < d.t[d.mva]).all()
    assert torch.isin(d.t[d.mva], grid).all() and torch.isin(d.s[d.mva], grid).all()
    in_fm = torch.zeros(64, dtype=torch.bool)
    in_fm[d.fm] = True
    assert not (d.dropped & ~in_fm).any()
    assert 2.5 <= d.w <= 4.5


# ----------------------------------------------------------------------------------------------------
# PDG: the weak path and path drop


def test_weak_path_calls_no_middle_block():
    model = ToyModel(hidden=16, depth=3)
    x, t, cond = torch.randn(5, 2, 1, 1, 1), torch.rand(5), labels_cond([0, 1, 2, 3, 0])
    model(x, t, t, cond, None, path="weak")
    assert model.middle_calls == 0
    model(x, t, t, cond, None, path="full")
    assert model.middle_calls == 3


class NoEMA(nn.Module):
    """An EMA that fails when called."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the objective called the EMA")


@pytest.mark.parametrize("name", ["fm", "sfm", "pdg-sfm"])
@pytest.mark.parametrize("mva_share", [0.0, 0.5])
def test_uses_ema_says_whether_the_step_calls_the_ema(name, mva_share):
    """Under FSDP the trainer gathers the sharded EMA only for steps whose objective says uses_ema: fm
    never calls it; the SFM family calls it for MVA's targets, so only while MVA is on."""
    torch.manual_seed(0)
    obj = make(name, **({} if name == "fm" else {"mva": True}))
    info = StepInfo(0, 100, mva_share=mva_share)
    assert obj.uses_ema(info) == (name != "fm" and mva_share > 0)
    x0, cond = torch.randn(16, 2, 1, 1, 1), labels_cond(torch.arange(16) % 4)
    net = Network(ToyModel(hidden=8, depth=3), NoEMA())
    if obj.uses_ema(info):
        with pytest.raises(AssertionError, match="called the EMA"):
            obj.loss(net, {"x0": x0, "cond": cond}, info)
    else:
        obj.loss(net, {"x0": x0, "cond": cond}, info).loss.backward()


def pdg_step(name: str, batch: int = 64, **options):
    torch.manual_seed(0)
    model = ToyModel(hidden=16, depth=3, record=True)
    obj = make(name, **options)
    x0 = torch.randn(batch, 2, 1, 1, 1)
    cond = labels_cond(torch.arange(batch) % 4)
    info = StepInfo(0, 100, mva_share=0.25)
    d = obj.draw(x0, info, torch.Generator().manual_seed(1))
    out = obj.loss_from(Network(model), x0, cond, d, info)
    out.loss.backward()
    return model, d, out


def test_path_dropped_samples_train_the_weak_path_with_null_condition_and_zero_guidance():
    model, d, _ = pdg_step("pdg-sfm", p_drop=0.5)
    weak_grad = [c for c in model.calls if c["path"] == "weak" and c["grad"]]
    assert len(weak_grad) == 1 and weak_grad[0]["n"] == int(d.dropped.sum()) > 0
    assert (weak_grad[0]["labels"] == NULL_LABEL).all() and (weak_grad[0]["guidance"] == 0).all()
    # the weak path also gives the unconditional velocity for the guided targets: null, w = 0, no grad
    weak_nograd = [c for c in model.calls if c["path"] == "weak" and not c["grad"]]
    assert len(weak_nograd) == 1 and (weak_nograd[0]["labels"] == NULL_LABEL).all()
    assert (weak_nograd[0]["guidance"] == 0).all()
    assert weak_nograd[0]["n"] == len(d.fm) - int(d.dropped.sum()) + len(d.scm)
    # the full path never sees the null condition and always gets the batch's guidance scale
    for c in model.calls:
        if c["path"] == "full":
            assert (c["labels"] != NULL_LABEL).all() and (c["guidance"] == d.w).all()
    full_calls = [c for c in model.calls if c["path"] == "full"]
    assert model.middle_calls == 3 * len(full_calls)


def test_sfm_uses_no_weak_path_and_drops_labels_on_the_full_path():
    model, d, _ = pdg_step("sfm", label_dropout=0.5)
    assert all(c["path"] == "full" for c in model.calls)
    (grad_call,) = [c for c in model.calls if c["grad"]]
    null = grad_call["labels"] == NULL_LABEL
    assert int(null.sum()) == int(d.dropped.sum()) > 0
    assert (grad_call["guidance"][null] == 0).all() and (grad_call["guidance"][~null] == d.w).all()


@pytest.mark.parametrize(
    ("name", "options", "calls"),
    [
        ("sfm", {}, 3),
        ("pdg-sfm", {}, 5),
        ("pdg-sfm", {"mva": True}, 7),
        ("sfm", {"mva": True, "mva_target": "online"}, 3),
    ],
)
def test_independent_passes_are_batched_into_few_network_calls(name, options, calls):
    model, _, _ = pdg_step(name, **options)
    assert len(model.calls) == calls


# ----------------------------------------------------------------------------------------------------
# declared cost vs counted passes


COST_CASES = [
    ("fm", {}, 0.0),
    ("sfm", {}, 0.0),
    ("sfm", {"mva": True}, 0.25),
    ("sfm", {"velocity_mix": 1.0}, 0.0),
    ("pdg-sfm", {}, 0.0),
    ("pdg-sfm", {"mva": True}, 0.25),
]


def counted(name, options, share, batch):
    torch.manual_seed(0)
    net = Network(ToyModel(hidden=8, depth=1), ema=ToyModel(hidden=8, depth=1))
    obj = make(name, **options)
    x0 = torch.randn(batch, 2, 1, 1, 1)
    batch_dict = {
        "x0": x0,
        "cond": labels_cond(torch.arange(batch) % 4),
        "generator": torch.Generator().manual_seed(2),
    }
    obj.loss(net, batch_dict, StepInfo(0, 100, mva_share=share)).loss.backward()
    counts = {k: net.counts[k] / batch for k in ("full_grad", "full_nograd", "weak")}
    return obj.cost(share).as_dict(), counts


@pytest.mark.parametrize(("name", "options", "share"), COST_CASES)
def test_declared_cost_equals_counted_passes_without_drops(name, options, share):
    drop = {"fm": "label_dropout", "sfm": "label_dropout", "pdg-sfm": "p_drop"}[name]
    declared, counts = counted(name, {**options, drop: 0.0}, share, batch=400)
    assert counts == pytest.approx(declared, abs=1e-12)


@pytest.mark.parametrize(("name", "options", "share"), COST_CASES)
def test_declared_cost_matches_counted_passes_on_a_large_batch(name, options, share):
    declared, counts = counted(name, options, share, batch=4000)
    assert counts == pytest.approx(declared, abs=0.02)


def test_pdg_saves_full_passes_over_sfm():
    sfm, pdg = make("sfm").cost(), make("pdg-sfm").cost()
    assert sfm == ForwardCost(full_grad=1.0, full_nograd=0.75 * 0.9 + 0.75, weak=0.0)
    assert pdg.full_grad + pdg.full_nograd < sfm.full_grad + sfm.full_nograd
    assert make("pdg-sfm", mva=True).cost(0.25).full_nograd == pytest.approx(2 * 0.1875 + 0.5)
    assert make("fm").cost() == ForwardCost(full_grad=1.0)


def test_solution_map_helper_is_the_euler_parameterization():
    x, F = torch.randn(3, 2, 1, 1, 1), torch.randn(3, 2, 1, 1, 1)
    t, s = torch.tensor([1.0, 0.5, 0.3]), torch.tensor([0.0, 0.25, 0.3])
    assert torch.allclose(solution_map(x, t, s, F), x + (s - t).view(-1, 1, 1, 1, 1) * F)


def test_self_guided_target_has_the_guided_velocity_as_its_fixed_point_and_less_noise():
    """guidance_target = 'self': where F_sg is the guided velocity of the mean, the target is the guided
    velocity of the mean plus the sample's own noise, not (1 + k) times it."""
    g = torch.Generator().manual_seed(0)
    mean, v_u, noise = (torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.tensor([2.5, 3.0, 4.5, 1.0], dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)  # t = 0.9: past the CFG decay time 0.8
    guided_mean = sf_module.guided_velocity(mean, v_u, w, t, 0.8)
    target = sf_module.self_guided_velocity(mean + noise, guided_mean, v_u, w, t, 0.8)
    torch.testing.assert_close(target, guided_mean + noise)
    sample_target = sf_module.guided_velocity(mean + noise, v_u, w, t, 0.8)
    k = sf_module.cfg_decay(t, 0.8) * (w - 1)
    torch.testing.assert_close(sample_target, guided_mean + (1 + k).view(-1, 1, 1, 1, 1) * noise)
