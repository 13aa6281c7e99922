import pytest

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_ce(logits_batch):
    from kd.losses.ce import CrossEntropy
    zs, _, y = logits_batch
    total, terms = evaluate(CrossEntropy(), outputs(zs), None, y)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-10)
    assert set(terms) == {"ce"}
