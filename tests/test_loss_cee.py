import pytest

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_hard_label_kd(logits_batch):
    from kd.losses.cee import HardLabelKD
    zs, zt, y = logits_batch
    expected = 0.7 * np_ce(zs.numpy(), zt.numpy().argmax(1)) + 0.3 * np_ce(zs.numpy(), y.numpy())
    total, _ = evaluate(HardLabelKD(beta=0.7), outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)
