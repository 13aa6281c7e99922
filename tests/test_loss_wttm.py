import math

import numpy as np
import pytest
import torch

from reference import batch as make_batch, cross_entropy as np_ce, evaluate, outputs, softmax as np_softmax

pytestmark = pytest.mark.usefixtures("float64")


def paper_wttm(zs, zt, gamma):
    """mean_i U_i * KL(q_i || p_s,i), q = p_t^gamma / U, U = sum_c p_t^gamma, from the paper / distiller_zoo/wttm.py."""
    ps, pt = np_softmax(np.asarray(zs)), np_softmax(np.asarray(zt))
    total = 0.0
    for i in range(len(ps)):
        w = [pt[i, c] ** gamma for c in range(ps.shape[1])]
        u = sum(w)
        q = [x / u for x in w]
        total += u * sum(q[c] * math.log(q[c] / ps[i, c]) for c in range(ps.shape[1]))
    return total / len(ps)


def _wttm(**overrides):
    from kd.losses.wttm import WTTM
    return WTTM(**{**dict(ce_weight=1.0, gamma=0.2, beta=4.0), **overrides})


def test_wttm_against_the_papers_formula(logits_batch):
    zs, zt, y = logits_batch
    gamma, beta, ce_weight = 0.2, 4.0, 0.5
    expected = paper_wttm(zs.numpy(), zt.numpy(), gamma)
    parts = _wttm(ce_weight=ce_weight, gamma=gamma, beta=beta)(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["wttm"].item() == pytest.approx(expected, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(beta * expected, rel=1e-10)
    assert parts.task.item() == pytest.approx(ce_weight * np_ce(zs.numpy(), y.numpy()), rel=1e-10)


def test_gamma_one_is_kd_at_temperature_one_without_weights(logits_batch):
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    _, wttm = evaluate(_wttm(gamma=1.0), outputs(zs), outputs(zt), y)
    _, kd = evaluate(VanillaKD(1.0, 0.5, False), outputs(zs), outputs(zt), y)
    assert wttm["wttm"].item() == pytest.approx(kd["kd"].item(), rel=1e-10)


def test_the_student_matches_the_transformed_teacher_not_the_teacher(logits_batch):
    zs, zt, y = logits_batch
    loss = _wttm(gamma=0.2)
    _, matched = evaluate(loss, outputs(0.2 * zt), outputs(zt), y)  # softmax(gamma z_t) = q
    assert abs(matched["wttm"].item()) < 1e-12
    _, plain = evaluate(loss, outputs(zt.clone()), outputs(zt), y)
    assert plain["wttm"].item() > 0.1
    _, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    shift = torch.randn(6, 1) * 10
    _, shifted = evaluate(loss, outputs(zs + shift), outputs(zt - shift), y)
    assert shifted["wttm"].item() == pytest.approx(terms["wttm"].item(), rel=1e-10)


def test_the_weight_u_favours_uncertain_teacher_samples():
    """A uniform student against a confident and an uncertain teacher row: each row's KL(q || uniform) = log C - H(q)
    is weighted by U = sum_c p_t^gamma, which lies in [1, C^(1 - gamma)] and is larger for the uncertain row."""
    c, gamma = 4, 0.5
    zt = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    _, terms = evaluate(_wttm(gamma=gamma), outputs(torch.zeros(2, c)), outputs(zt), torch.tensor([0, 0]))
    pt = np_softmax(zt.numpy())
    u = (pt**gamma).sum(1)
    q = pt**gamma / u[:, None]
    kl = np.log(c) + (q * np.log(q)).sum(1)
    assert 1 <= u[0] < u[1] <= c ** (1 - gamma)
    assert terms["wttm"].item() == pytest.approx(float(np.mean(u * kl)), rel=1e-10)


def test_extreme_logits_stay_finite_in_float32():
    zs = (torch.tensor([[1e4, 0.0, -1e4], [0.0, -1e4, 1e4]])).float().requires_grad_(True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [1e4, 0.0, 0.0]]).float()
    parts = _wttm()(outputs(zs), outputs(zt), make_batch(torch.tensor([0, 1])))
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(zs.grad).all()
    # the student's confidence in the wrong class costs about U * (1e4 + 1e4) for the first row
    assert parts.terms["wttm"].item() > 1e3
