import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import (batch as make_batch, cross_entropy as np_ce, logit_fixture_inputs, outputs,
                       softmax as np_softmax)

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "nkd_reference.json"


def _nkd(ce_weight=1.0, gamma=3.5, temperature=3.0):
    from kd.losses.nkd import NKD
    return NKD(ce_weight=ce_weight, gamma=gamma, temperature=temperature)


def paper_nkd(zs, zt, y, T):
    """Per-sample (target_i, non_target_i) of the paper's NKD loss, with loops: -T_y log S_y, and
    -T^2 sum_{c != y} N(T^T)_c log N(S^T)_c, N the distribution renormalised over the non-target classes."""
    ps, pt = np_softmax(zs), np_softmax(zt)
    ps_T, pt_T = np_softmax(np.asarray(zs) / T), np_softmax(np.asarray(zt) / T)
    target, non_target = [], []
    for i, g in enumerate(np.asarray(y)):
        target.append(-pt[i, g] * math.log(ps[i, g]))
        others = [c for c in range(ps.shape[1]) if c != g]
        ns, nt = ps_T[i, others] / ps_T[i, others].sum(), pt_T[i, others] / pt_T[i, others].sum()
        non_target.append(-T * T * sum(nt[k] * math.log(ns[k]) for k in range(len(others))))
    return np.array(target), np.array(non_target)


@pytest.mark.parametrize("T, gamma", [(3.0, 3.5), (1.0, 1.5), (4.0, 0.0)])
def test_nkd_against_the_papers_formula(logits_batch, T, gamma):
    zs, zt, y = logits_batch
    target, non_target = paper_nkd(zs.numpy(), zt.numpy(), y.numpy(), T)
    parts = _nkd(ce_weight=0.7, gamma=gamma, temperature=T)(outputs(zs), outputs(zt), make_batch(y))
    ce = np_ce(zs.numpy(), y.numpy())
    assert parts.terms["target"].item() == pytest.approx(target.mean(), rel=1e-10)
    assert parts.terms["non_target"].item() == pytest.approx(non_target.mean(), rel=1e-10)
    assert parts.task.item() == pytest.approx(0.7 * ce, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(target.mean() + gamma * non_target.mean(), rel=1e-10)


def assert_gradient(grad, weights, expected, rel=1e-9):
    np.testing.assert_allclose(grad[0].numpy(), expected["first_row"], rtol=rel, atol=1e-15)
    assert grad.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=rel)
    assert (grad**2).sum().item() == pytest.approx(expected["square_sum"], rel=rel)
    assert (grad * weights).sum().item() == pytest.approx(expected["weighted_sum"], rel=rel)


@pytest.mark.parametrize("case", ["cifar100", "imagenet"])
def test_nkd_matches_the_authors_code(case):
    """Fixture: NKDLoss of yzd-v/cls_KD (value and gradient wrt the student's logits) on seeded float64 logits, 64 x
    100; the authors' loss is our distillation part (their CE comes from the classifier head)."""
    reference = json.loads(FIXTURE.read_text())
    zs, zt, y, weights = logit_fixture_inputs(reference["inputs"])
    expected = reference["cases"][case]
    z = zs.clone().requires_grad_()
    parts = _nkd(gamma=expected["gamma"], temperature=expected["temperature"])(outputs(z), outputs(zt), make_batch(y))
    assert parts.distillation.item() == pytest.approx(expected["value"], rel=1e-10)
    parts.distillation.backward()
    assert_gradient(z.grad, weights, expected["gradient_wrt_student_logits"])


def test_the_non_target_term_is_minimal_when_the_student_equals_the_teacher(logits_batch):
    """A cross-entropy in the teacher's non-target distribution: at z_s = z_t its gradient vanishes and its value is
    T^2 times the teacher's non-target entropy, below its value for any other student; the label's logit gets no
    gradient from it."""
    zs, zt, y = logits_batch
    T = 3.0
    loss = _nkd(temperature=T)
    z = zt.clone().requires_grad_()
    at_teacher = loss(outputs(z), outputs(zt), make_batch(y)).terms["non_target"]
    at_teacher.backward()
    assert z.grad.abs().max().item() < 1e-12
    pt = np_softmax(zt.numpy() / T)
    entropy = []
    for i, g in enumerate(y.numpy()):
        q = np.delete(pt[i], g) / np.delete(pt[i], g).sum()
        entropy.append(-(q * np.log(q)).sum())
    assert at_teacher.item() == pytest.approx(T * T * np.mean(entropy), rel=1e-10)
    z = zs.clone().requires_grad_()
    elsewhere = loss(outputs(z), outputs(zt), make_batch(y)).terms["non_target"]
    assert elsewhere.item() > at_teacher.item()
    elsewhere.backward()
    assert z.grad[torch.arange(len(y)), y].abs().max().item() == 0.0
