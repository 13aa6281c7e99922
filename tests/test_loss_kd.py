import math

import numpy as np
import pytest

from reference import batch as make_batch, cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_vanilla_kd(logits_batch):
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    T, alpha = 4.0, 0.7
    ps, pt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    kl = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)])
    expected = alpha * T * T * kl + (1 - alpha) * np_ce(zs.numpy(), y.numpy())
    loss = VanillaKD(temperature=T, alpha=alpha, standardize=False)
    total, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert terms["kd"].item() == pytest.approx(T * T * kl, rel=1e-10)
    parts = loss(outputs(zs), outputs(zt), make_batch(y))
    assert parts.task.item() == pytest.approx((1 - alpha) * np_ce(zs.numpy(), y.numpy()), rel=1e-10)
    assert parts.distillation.item() == pytest.approx(alpha * T * T * kl, rel=1e-10)


def test_the_distillation_term_vanishes_when_student_equals_teacher(logits_batch):
    from kd.losses.kd import VanillaKD
    zs, _, y = logits_batch
    _, terms = evaluate(VanillaKD(4.0, 0.7, False), outputs(zs), outputs(zs.clone()), y)
    assert abs(terms["kd"].item()) < 1e-12


def test_entropy_aware_kd_against_the_papers_formula(logits_batch):
    """EA-KD: T^2 * mean_i w_i KL_i, w_i = H_t,i (1 + H_s,i / H_ub) / 2, H the entropy of softmax(z / T'), T' = 3."""
    from kd.losses.kd import WeightedKD
    zs, zt, y = logits_batch
    T, t, bound = 4.0, 3.0, 100.0
    ps, pt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    kl = [sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)]
    qs, qt = np.exp(np_log_softmax(zs.numpy() / t)), np.exp(np_log_softmax(zt.numpy() / t))
    h_s, h_t = -(qs * np.log(qs)).sum(1), -(qt * np.log(qt)).sum(1)
    w = (h_t + h_t * h_s / bound) / 2
    loss = WeightedKD(T, 0.1, 0.9, standardize=False, entropy_aware=True, entropy_temperature=t, entropy_bound=bound)
    parts = loss(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["kd"].item() == pytest.approx(T * T * np.mean(w * np.array(kl)), rel=1e-10)
    assert parts.distillation.item() == pytest.approx(0.9 * T * T * np.mean(w * np.array(kl)), rel=1e-10)
    assert parts.task.item() == pytest.approx(0.1 * np_ce(zs.numpy(), y.numpy()), rel=1e-12)
    assert parts.terms["entropy_weight"].item() == pytest.approx(w.mean(), rel=1e-12)
    _, same = evaluate(loss, outputs(zs), outputs(zs.clone()), y)
    assert abs(same["kd"].item()) < 1e-12  # still zero when the student matches the teacher
