import math

import numpy as np
import pytest
import torch

from reference import batch as make_batch, cross_entropy as np_ce, evaluate, outputs, softmax as np_softmax

pytestmark = pytest.mark.usefixtures("float64")


def pearson(a, b, eps=1e-8):
    """The reference's Pearson: centred dot product over (product of the centred norms + eps), in a loop."""
    a = [x - sum(a) / len(a) for x in a]
    b = [x - sum(b) / len(b) for x in b]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + eps)


def paper_dist(zs, zt, tau, beta, gamma):
    ys, yt = np_softmax(np.asarray(zs) / tau), np_softmax(np.asarray(zt) / tau)
    n, c = ys.shape
    inter = tau**2 * (1 - np.mean([pearson(list(ys[i]), list(yt[i])) for i in range(n)]))
    intra = tau**2 * (1 - np.mean([pearson(list(ys[:, j]), list(yt[:, j])) for j in range(c)]))
    return inter, intra, beta * inter + gamma * intra


def _dist(**overrides):
    from kd.losses.dist import DIST
    return DIST(**{**dict(ce_weight=1.0, weight=2.0, beta=1.0, gamma=1.0, tau=4.0), **overrides})


def test_dist_against_the_papers_formula(logits_batch):
    zs, zt, y = logits_batch
    tau, beta, gamma, weight, ce_weight = 4.0, 1.5, 0.5, 2.0, 0.8
    inter, intra, dist = paper_dist(zs.numpy(), zt.numpy(), tau, beta, gamma)
    parts = _dist(ce_weight=ce_weight, weight=weight, beta=beta, gamma=gamma, tau=tau)(outputs(zs), outputs(zt),
                                                                                          make_batch(y))
    assert parts.terms["inter"].item() == pytest.approx(inter, rel=1e-10)
    assert parts.terms["intra"].item() == pytest.approx(intra, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(weight * dist, rel=1e-10)
    assert parts.task.item() == pytest.approx(ce_weight * np_ce(zs.numpy(), y.numpy()), rel=1e-10)


def test_a_hand_made_anticorrelated_case():
    """Two samples, two classes, each preferring the other class than the teacher: every correlation is -1,
    so inter = intra = 2 tau^2 (up to the eps against norms of about 0.06)."""
    zs, zt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    _, terms = evaluate(_dist(), outputs(zs), outputs(zt), torch.tensor([0, 1]))
    assert terms["inter"].item() == pytest.approx(2 * 16, rel=1e-5)
    assert terms["intra"].item() == pytest.approx(2 * 16, rel=1e-5)


def test_dist_invariants(logits_batch):
    zs, zt, y = logits_batch
    loss = _dist()
    _, same = evaluate(loss, outputs(zs), outputs(zs.clone()), y)
    inter, intra, _ = paper_dist(zs.numpy(), zs.numpy(), 4.0, 1.0, 1.0)  # not exactly 0: the eps (see the last test)
    assert same["inter"].item() == pytest.approx(inter, rel=1e-6)
    assert same["intra"].item() == pytest.approx(intra, rel=1e-6)
    assert 0 <= same["inter"].item() < 1e-4 and 0 <= same["intra"].item() < 1e-4
    _, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    _, swapped = evaluate(loss, outputs(zt), outputs(zs), y)
    for name in ("inter", "intra"):  # symmetric in student and teacher, and within [0, 2 tau^2]
        assert swapped[name].item() == pytest.approx(terms[name].item(), rel=1e-12)
        assert 0 <= terms[name].item() <= 2 * 16
    shift = torch.randn(6, 1) * 10
    perm = torch.randperm(6)
    _, moved = evaluate(loss, outputs((zs + shift)[perm]), outputs(zt[perm]), y[perm])
    for name in ("inter", "intra"):  # per-sample logit offsets and a joint reordering of the batch change nothing
        assert moved[name].item() == pytest.approx(terms[name].item(), rel=1e-10)


def test_intra_depends_on_the_rest_of_the_batch(logits_batch):
    zs, zt, y = logits_batch
    _, full = evaluate(_dist(), outputs(zs), outputs(zt), y)
    _, part = evaluate(_dist(), outputs(zs[:3]), outputs(zt[:3]), y[:3])
    _, other = evaluate(_dist(), outputs(zs[3:]), outputs(zt[3:]), y[3:])
    assert full["inter"].item() == pytest.approx((part["inter"].item() + other["inter"].item()) / 2, rel=1e-10)
    assert full["intra"].item() != pytest.approx((part["intra"].item() + other["intra"].item()) / 2, rel=1e-3)


def test_identical_but_very_confident_inputs_leave_a_residue_from_the_eps():
    """A class that is near 0 for every sample has centred norms far below sqrt(1e-8): its correlation is about 0
    instead of 1, so intra stays above 0 for y_s == y_t, as in the reference (the oracle reproduces it)."""
    z = torch.tensor([[60.0, 0.0, 5.0], [0.0, 60.0, 0.0], [60.0, 0.0, -5.0]])  # class 2: p of 1e-7 to 1e-6
    _, terms = evaluate(_dist(), outputs(z), outputs(z.clone()), torch.tensor([0, 1, 0]))
    _, intra, _ = paper_dist(z.numpy(), z.numpy(), 4.0, 1.0, 1.0)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-8)
    assert intra > 16 * 0.3 and abs(terms["inter"].item()) < 1e-6  # one class of three correlates at about 0
