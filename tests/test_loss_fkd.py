import math

import numpy as np
import pytest

from reference import cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_focal_kd(logits_batch):
    from kd.losses.fkd import FocalKD
    zs, zt, y = logits_batch
    T, gamma, lam = 4.0, 2.0, 1.0
    ps, pt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    fkd = np.mean([sum((1 - ps[i, c]) ** gamma * pt[i, c] * (math.log(pt[i, c]) - math.log(ps[i, c]))
                       for c in range(10)) for i in range(6)]) * T * T
    total, terms = evaluate(FocalKD(temperature=T, gamma=gamma, weight=lam), outputs(zs), outputs(zt), y)
    assert terms["fkd"].item() == pytest.approx(fkd, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + lam * fkd, rel=1e-10)


def test_the_distillation_term_vanishes_when_student_equals_teacher(logits_batch):
    from kd.losses.fkd import FocalKD
    zs, _, y = logits_batch
    _, terms = evaluate(FocalKD(4.0, 2.0, 1.0), outputs(zs), outputs(zs.clone()), y)
    assert abs(terms["fkd"].item()) < 1e-12
