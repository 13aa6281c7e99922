import math

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs, softmax as np_softmax

pytestmark = pytest.mark.usefixtures("float64")
TEMPERATURES = [4.0, 3.0, 5.0, 2.0, 6.0]


def _mlkd(mask_percentile=50.0, temperatures=TEMPERATURES):
    from kd.losses.mlkd import MLKD
    return MLKD(temperatures=temperatures, mask_percentile=mask_percentile, ce_weight=0.1, kd_weight=0.9)


def np_terms(zs, zt, percentile=50.0, temperatures=TEMPERATURES):
    """The three levels written out with loops, masks from numpy.percentile as in KD_ours.py."""
    B, C = zs.shape
    p1 = np_softmax(zt)
    confidence, class_mass = p1.max(1), p1.sum(0)
    keep = confidence <= np.percentile(confidence, percentile)
    keep_class = class_mass <= np.percentile(class_mass, percentile)
    instance = batch = klass = 0.0
    for T in temperatures:
        ls, lt = np_log_softmax(zs / T), np_log_softmax(zt / T)
        ps, pt = np.exp(ls), np.exp(lt)
        instance += sum(keep[i] * T * T * sum(pt[i, c] * (lt[i, c] - ls[i, c]) for c in range(C))
                        for i in range(B)) / B
        for i in range(B):
            for j in range(B):
                if keep[j]:
                    gt = sum(pt[i, c] * pt[j, c] for c in range(C))
                    gs = sum(ps[i, c] * ps[j, c] for c in range(C))
                    batch += (gt - gs) ** 2 / B
        for a in range(C):
            for b in range(C):
                if keep_class[b]:
                    mt = sum(pt[i, a] * pt[i, b] for i in range(B))
                    ms = sum(ps[i, a] * ps[i, b] for i in range(B))
                    klass += (mt - ms) ** 2 / C
    return instance, batch, klass, keep, keep_class


@pytest.mark.parametrize("percentile", [50.0, 100.0, 30.0])
def test_mlkd_against_loops(logits_batch, percentile):
    zs, zt, y = logits_batch
    instance, batch, klass, keep, keep_class = np_terms(zs.numpy(), zt.numpy(), percentile)
    total, terms = evaluate(_mlkd(percentile), outputs(zs), outputs(zt), y)
    assert terms["instance"].item() == pytest.approx(instance, rel=1e-10)
    assert terms["batch"].item() == pytest.approx(batch, rel=1e-10)
    assert terms["class"].item() == pytest.approx(klass, rel=1e-10)
    expected = 0.1 * np_ce(zs.numpy(), y.numpy()) + 0.9 * (instance + batch + klass)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    if percentile == 50.0:  # the median keeps half of 6 distinct confidences and half of 10 class masses
        assert keep.sum() == 3 and keep_class.sum() == 5
    if percentile == 100.0:
        assert keep.all() and keep_class.all()


def test_masks_keep_the_teachers_less_confident_samples_and_classes():
    loss = _mlkd()
    zt = torch.tensor([[9.0, 0, 0], [0, 1.0, 0], [0, 0, 5.0], [0.5, 0, 0]])  # top probabilities: high, low, high, low
    samples, classes = loss.masks(zt)
    assert samples.tolist() == [0, 1, 0, 1]
    mass = torch.softmax(zt, 1).sum(0)
    assert classes.tolist() == (mass <= mass.median()).double().tolist() and classes.sum() == 2


def test_the_instance_term_ignores_samples_the_mask_drops(logits_batch):
    zs, zt, y = logits_batch
    loss = _mlkd()
    dropped = int(torch.nonzero(loss.masks(zt)[0] == 0)[0])
    moved = zs.clone()
    moved[dropped] = torch.randn(10) * 5
    _, before = evaluate(loss, outputs(zs), outputs(zt), y)
    _, after = evaluate(loss, outputs(moved), outputs(zt), y)
    assert after["instance"].item() == pytest.approx(before["instance"].item(), rel=1e-12)
    assert after["batch"].item() != pytest.approx(before["batch"].item())  # its correlations with kept samples count


def test_every_level_vanishes_when_student_equals_teacher(logits_batch):
    zs, _, y = logits_batch
    _, terms = evaluate(_mlkd(100.0), outputs(zs), outputs(zs.clone()), y)
    assert all(abs(terms[k].item()) < 1e-14 for k in ("instance", "batch", "class"))


def test_invariant_to_adding_a_constant_to_each_row(logits_batch):
    zs, zt, y = logits_batch
    shift_s, shift_t = torch.randn(6, 1) * 10, torch.randn(6, 1) * 10
    _, terms = evaluate(_mlkd(), outputs(zs), outputs(zt), y)
    _, shifted = evaluate(_mlkd(), outputs(zs + shift_s), outputs(zt + shift_t), y)
    for k in ("instance", "batch", "class"):
        assert shifted[k].item() == pytest.approx(terms[k].item(), rel=1e-9)


def test_correlation_levels_are_symmetric_in_student_and_teacher_when_nothing_is_masked(logits_batch):
    zs, zt, y = logits_batch
    _, forward = evaluate(_mlkd(100.0), outputs(zs), outputs(zt), y)
    _, swapped = evaluate(_mlkd(100.0), outputs(zt), outputs(zs), y)
    for k in ("batch", "class"):
        assert swapped[k].item() == pytest.approx(forward[k].item(), rel=1e-12)


def test_one_temperature_without_masks_is_vanilla_kd_plus_the_two_correlation_terms(logits_batch):
    zs, zt, y = logits_batch
    T = 4.0
    _, terms = evaluate(_mlkd(100.0, [T]), outputs(zs), outputs(zt), y)
    ps, pt = np_softmax(zs.numpy() / T), np_softmax(zt.numpy() / T)
    kl = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)])
    assert terms["instance"].item() == pytest.approx(T * T * kl, rel=1e-10)
    assert terms["batch"].item() == pytest.approx(np.sum((pt @ pt.T - ps @ ps.T) ** 2) / 6, rel=1e-10)
    assert terms["class"].item() == pytest.approx(np.sum((pt.T @ pt - ps.T @ ps) ** 2) / 10, rel=1e-10)
