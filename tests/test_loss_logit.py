import numpy as np
import pytest

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_logit_matching(logits_batch):
    from kd.losses.logit import LogitMatching
    zs, zt, y = logits_batch
    expected = np_ce(zs.numpy(), y.numpy()) + 1.5 * np.mean((zs.numpy() - zt.numpy()) ** 2)
    total, _ = evaluate(LogitMatching(weight=1.5), outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)


def test_the_distillation_term_vanishes_when_student_equals_teacher(logits_batch):
    from kd.losses.logit import LogitMatching
    zs, _, y = logits_batch
    _, terms = evaluate(LogitMatching(1.0), outputs(zs), outputs(zs.clone()), y)
    assert abs(terms["mse"].item()) < 1e-12
