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
