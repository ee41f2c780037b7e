"""The objectives on the real VideoDiT at the demo's clip size, against per-sample hand computations.

tests/test_objectives.py checks the equations on an affine stand-in; here every target and prediction is
a separate float64 call of the `tiny` VideoDiT (random, non-zero weights) on one sample, written as the
notes state the formulas, and the objective's batched, index-juggled computation must agree with it.
"""

from __future__ import annotations

import pytest
import torch

from eflow.condition import NULL_LABEL, Condition
from eflow.model.dit import build_model
from eflow.network import Network
from eflow.objective import StepInfo
from eflow.plugins.objectives.fm import FlowMatching, FMDraws
from eflow.plugins.objectives.solution_flow import SFMDraws, SolutionFlow, cfg_decay

B, C, T, H, W = 6, 3, 4, 16, 16  # the demo clip (16 x 16 pixels) shortened to 4 frames: 64 tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", attention="glga", num_classes=5).double()
    with torch.no_grad():  # AdaLN-Zero makes F = 0 at init: perturb every weight so F is informative
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(B, C, T, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x1 = torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64)
    return x0, x1, torch.tensor([0, 1, 2, 3, 4, 1])


def F(model, x, t, s, label, w, path="full"):
    """The network on one sample [1, C, T, H, W] at scalar times, label and guidance (float64)."""
    one = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    return model(x, one(t), one(s), Condition(labels=torch.tensor([label])), one(w), path=path)


def f(model, x, t, s, label, w):
    """The solution map f = x + (s - t) F."""
    return x + (s - t) * F(model, x, t, s, label, w)


def mse(a, b):
    return ((a - b) ** 2).mean()


@pytest.mark.parametrize("pdg", [False, True])
def test_solution_flow_terms_equal_per_sample_hand_computation_on_the_video_dit(model, batch, pdg):
    x0, x1, labels = batch
    p, eps, w, mix = 1.0, 0.01, 3.5, 0.25
    obj = SolutionFlow(total_steps=100, pdg=pdg, mva=True, mva_target="online")
    draws = SFMDraws(
        x1=x1,
        fm=torch.tensor([4, 0, 2]),  # sample 0 is dropped
        scm=torch.tensor([1, 5]),
        mva=torch.tensor([3]),
        t=torch.tensor([0.6, 0.95, 0.3, 0.9, 0.85, 0.4], dtype=torch.float64),
        l=torch.tensor([0.6, 0.9, 0.3, 0.5, 0.85, 0.35], dtype=torch.float64),
        s=torch.tensor([0.6, 0.2, 0.3, 0.1, 0.85, 0.05], dtype=torch.float64),
        w=w,
        dropped=torch.tensor([True, False, False, False, False, False]),
    )
    out = obj.loss_from(Network(model), x0, Condition(labels=labels), draws)
    uncond = "weak" if pdg else "full"
    adaptive = lambda e: 1.0 / (e + eps) ** p  # noqa: E731
    terms = {}
    with torch.no_grad():
        for i in range(B):
            t, l, s = (float(v[i]) for v in (draws.t, draws.l, draws.s))
            xi0, xi1, c = x0[i : i + 1], x1[i : i + 1], int(labels[i])
            x_t = (1 - t) * xi0 + t * xi1
            v = xi1 - xi0
            v_g = v + float(cfg_decay(torch.tensor([t]), 0.8)) * (w - 1) * (
                v - F(model, x_t, t, t, NULL_LABEL, 0.0, uncond)
            )
            if i == 0:  # dropped FM sample: null condition, guidance 0, plain v; the weak path for pdg-sfm
                e = mse(F(model, x_t, t, t, NULL_LABEL, 0.0, "weak" if pdg else "full"), v)
                terms[i] = ("fm", adaptive(e) * e)
            elif i in (2, 4):  # FM: the guided target mixed with the pass's own (detached) prediction
                F_c = F(model, x_t, t, t, c, w)
                e = mse(F_c, mix * v_g + (1 - mix) * F_c)
                terms[i] = ("fm", adaptive(e) * e)
            elif i in (1, 5):  # SCM: one Euler step along the mixed velocity, then the target map
                v_mix = mix * v_g + (1 - mix) * F(model, x_t, t, t, c, w)
                x_l = x_t + (l - t) * v_mix
                e = mse(f(model, x_t, t, s, c, w), f(model, x_l, l, s, c, w))
                terms[i] = ("scm", e / ((t - l) * (t - s)) * adaptive(e / (t - l) ** 2))
            else:  # MVA: the direct jump against the composed one (online weights, as configured)
                composed = f(model, f(model, x_t, t, l, c, w), l, s, c, w)
                terms[i] = ("mva", mse(f(model, x_t, t, s, c, w), composed))
    for name in ("fm", "scm", "mva"):
        values = [v for kind, v in terms.values() if kind == name]
        assert float(out.metrics[f"loss_{name}"]) == pytest.approx(
            torch.stack(values).mean().item(), rel=1e-9
        )
    total = sum(v for _, v in terms.values()) / B
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-9)


def test_fm_loss_equals_per_sample_hand_computation_on_the_video_dit(model, batch):
    x0, x1, labels = batch
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    dropped = torch.tensor([False, True, False, False, True, False])
    out = FlowMatching(total_steps=10).loss_from(
        Network(model), x0, Condition(labels=labels), FMDraws(x1, t, dropped)
    )
    with torch.no_grad():
        expected = torch.stack(
            [
                mse(
                    F(model, (1 - t[i]) * x0[i : i + 1] + t[i] * x1[i : i + 1], t[i], t[i],
                      NULL_LABEL if dropped[i] else int(labels[i]), 0.0),
                    x1[i : i + 1] - x0[i : i + 1],
                )
                for i in range(B)
            ]
        ).mean()  # fmt: skip
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize(
    "pdg, options",
    [
        (False, {"mva": True}),
        (True, {"mva": True}),
        (True, {"mva": True, "target": "ema", "velocity_mix": 1.0}),
        (False, {"mva": True, "mva_target": "online", "mix_fm_target": False}),
        (True, {"mva": True, "guidance_target": "self"}),
        (False, {"mva": True, "guidance_target": "self", "velocity_mix": 1.0}),
    ],
)
def test_batched_solution_flow_loss_equals_its_per_sample_reference(model, batch, pdg, options):
    """loss_from (index sets, concatenated passes) against reference_loss (Algorithm 1, one sample and one
    call at a time), on random draws with every group present and some labels dropped."""
    import copy

    x0, x1, labels = batch
    drop = {"p_drop": 0.5} if pdg else {"label_dropout": 0.5}
    obj = SolutionFlow(total_steps=100, pdg=pdg, **drop, **options)
    ema = copy.deepcopy(model)
    with torch.no_grad():  # an EMA copy that differs from the online weights
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net = Network(model, ema=ema)
    g = torch.Generator().manual_seed(3)
    draws = obj.draw(x0, StepInfo(step=10, total_steps=100, mva_share=0.34), generator=g)
    draws.x1 = x1
    assert min(len(draws.fm), len(draws.scm), len(draws.mva)) > 0 and draws.dropped.any()
    with torch.no_grad():
        batched = obj.loss_from(net, x0, Condition(labels=labels), draws).loss
    reference = obj.reference_loss(net, x0, Condition(labels=labels), draws)
    assert batched.item() == pytest.approx(reference.item(), rel=1e-9)
