import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import (batch as make_batch, cross_entropy as np_ce, logit_fixture_inputs, outputs,
                       softmax as np_softmax)

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "rld_reference.json"


def _rld(**overrides):
    from kd.losses.rld import RLD
    args = dict(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, scd_temperature=4.0, warmup_fraction=20 / 240,
                standardize=False)
    return RLD(**{**args, **overrides})


def paper_rld(zs, zt, y, T, T_a):
    """Per-sample (SCD_i, MCD_i) from the paper, with loops: a binary KL between the teacher's [p_max, 1 - p_max]
    and the student's [p_y, 1 - p_y] at T_a; a KL over the classes the teacher ranks below the label, renormalised,
    at T (0 for a sample with no such class)."""
    zs, zt = np.asarray(zs), np.asarray(zt)
    ps_a, pt_a = np_softmax(zs / T_a), np_softmax(zt / T_a)
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    scd, mcd = [], []
    for i, g in enumerate(np.asarray(y)):
        m = int(np.argmax(zt[i]))
        bs, bt = [ps_a[i, g], 1 - ps_a[i, g]], [pt_a[i, m], 1 - pt_a[i, m]]
        scd.append(T_a * T_a * sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2)))
        kept = [c for c in range(zs.shape[1]) if zt[i, c] < zt[i, g]]
        if not kept:
            mcd.append(0.0)
            continue
        qs, qt = ps[i, kept] / ps[i, kept].sum(), pt[i, kept] / pt[i, kept].sum()
        mcd.append(T * T * sum(qt[k] * math.log(qt[k] / qs[k]) for k in range(len(kept))))
    return np.array(scd), np.array(mcd)


def zscore(a):
    return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)


@pytest.mark.parametrize("T, T_a, standardize", [(4.0, 4.0, False), (4.0, 1.0, False), (2.0, 2.0, True)])
def test_rld_against_the_papers_formula(logits_batch, T, T_a, standardize):
    zs, zt, y = logits_batch
    assert (zt.argmax(1) != y).any()  # some samples where the teacher is wrong: SCD's two bins differ in class
    a_s, a_t = (zscore(zs.numpy()), zscore(zt.numpy())) if standardize else (zs.numpy(), zt.numpy())
    scd, mcd = paper_rld(a_s, a_t, y.numpy(), T, T_a)
    loss = _rld(ce_weight=0.5, alpha=2.0, beta=8.0, temperature=T, scd_temperature=T_a, standardize=standardize)
    parts = loss(outputs(zs), outputs(zt), make_batch(y))  # no progress: the warm-up factor is 1
    assert parts.terms["scd"].item() == pytest.approx(scd.mean(), rel=1e-9)
    assert parts.terms["mcd"].item() == pytest.approx(mcd.mean(), rel=1e-9)
    assert parts.task.item() == pytest.approx(0.5 * np_ce(zs.numpy(), y.numpy()), rel=1e-10)  # raw logits
    assert parts.distillation.item() == pytest.approx(2.0 * scd.mean() + 8.0 * mcd.mean(), rel=1e-9)


@pytest.mark.parametrize("case", ["same_t", "cfg_default", "logit_stand"])
def test_rld_matches_the_authors_code(case):
    """Fixture: rld_loss of zju-SWJ/RLD on seeded float64 logits, 64 x 100, a third of the samples mispredicted by
    the teacher: value, each term, and the gradient wrt the student's logits."""
    reference = json.loads(FIXTURE.read_text())
    zs, zt, y, weights = logit_fixture_inputs(reference["inputs"])
    assert int((zt.argmax(1) != y).sum()) == reference["teacher_wrong"]
    expected = reference["cases"][case]
    loss = _rld(alpha=expected["alpha"], beta=expected["beta"], temperature=expected["temperature"],
                scd_temperature=expected["scd_temperature"], standardize=expected["standardize"])
    z = zs.clone().requires_grad_()
    parts = loss(outputs(z), outputs(zt), make_batch(y))
    assert parts.distillation.item() == pytest.approx(expected["value"], rel=1e-10)
    assert parts.terms["scd"].item() == pytest.approx(expected["scd"], rel=1e-10)
    assert parts.terms["mcd"].item() == pytest.approx(expected["mcd"], rel=1e-10)
    parts.distillation.backward()
    grad, summary = z.grad, expected["gradient_wrt_student_logits"]
    np.testing.assert_allclose(grad[0].numpy(), summary["first_row"], rtol=1e-9, atol=1e-15)
    assert grad.abs().sum().item() == pytest.approx(summary["abs_sum"], rel=1e-9)
    assert (grad**2).sum().item() == pytest.approx(summary["square_sum"], rel=1e-9)
    assert (grad * weights).sum().item() == pytest.approx(summary["weighted_sum"], rel=1e-9)


def test_both_terms_vanish_when_the_student_equals_a_teacher_that_is_right(logits_batch):
    """Where the teacher's top class is the label, RLD at z_s = z_t is 0; where it is wrong, SCD still pulls the
    student's label probability towards the teacher's top-class confidence (the refinement), and MCD is 0."""
    _, zt, y = logits_batch
    zt = zt.clone()
    zt[:3][torch.arange(3), y[:3]] = zt[:3].max(1).values + 0.5  # the teacher right on the first three samples
    right = zt.argmax(1) == y
    assert right.tolist() == [True] * 3 + [False] * 3
    parts = _rld()(outputs(zt[right]), outputs(zt[right].clone()), make_batch(y[right]))
    assert abs(parts.terms["scd"].item()) < 1e-12 and abs(parts.terms["mcd"].item()) < 1e-12
    parts = _rld()(outputs(zt[~right]), outputs(zt[~right].clone()), make_batch(y[~right]))
    assert abs(parts.terms["mcd"].item()) < 1e-12 and parts.terms["scd"].item() > 1e-3


def test_a_label_the_teacher_ranks_last_adds_no_mcd_and_no_nan():
    """Every class hidden (the authors' -1e9 fill leaves two uniform distributions, KL 0): 0 here, finite gradient."""
    zt = torch.tensor([[3.0, 1.0, -2.0, 0.5], [0.2, 2.0, -1.0, 0.0]])
    zs = torch.tensor([[0.1, 0.4, 1.0, -0.3], [1.0, -0.5, 0.3, 0.2]], requires_grad=True)
    y = torch.tensor([2, 0])  # row 0: the teacher's lowest logit; row 1: two classes kept
    parts = _rld()(outputs(zs), outputs(zt), make_batch(y))
    _, mcd = paper_rld(zs.detach().numpy(), zt.numpy(), y.numpy(), 4.0, 4.0)
    assert mcd[0] == 0.0 and mcd[1] > 0
    assert parts.terms["mcd"].item() == pytest.approx(mcd.mean(), rel=1e-10)
    parts.total.backward()
    assert torch.isfinite(zs.grad).all()


def test_with_a_right_teacher_rld_is_dkd(logits_batch):
    """When the teacher's strict top class is the label, SCD is DKD's TCKD and MCD its NCKD (same temperature)."""
    from kd.losses.dkd import DKD
    zs, zt, y = logits_batch
    zt = zt.clone()
    zt[torch.arange(len(y)), y] = zt.max(1).values + 1.0
    rld = _rld()(outputs(zs), outputs(zt), make_batch(y)).terms
    dkd = DKD(1.0, 1.0, 8.0, 4.0, 20 / 240, False)(outputs(zs), outputs(zt), make_batch(y)).terms
    assert rld["scd"].item() == pytest.approx(dkd["tckd"].item(), rel=1e-10)
    assert rld["mcd"].item() == pytest.approx(dkd["nckd"].item(), rel=1e-10)


def test_the_warmup_scales_the_rld_term_and_not_the_label_loss(logits_batch):
    from kd.losses.batch import Progress
    zs, zt, y = logits_batch
    loss = _rld()
    full = loss(outputs(zs), outputs(zt), make_batch(y))
    for epoch, step, steps, epochs, factor in [(0, 9, 10, 240, 1 / 20), (9, 9, 10, 240, 0.5), (19, 9, 10, 240, 1.0)]:
        parts = loss(outputs(zs), outputs(zt), make_batch(y, progress=Progress(epoch, step, steps, epochs)))
        assert parts.distillation.item() == pytest.approx(factor * full.distillation.item(), rel=1e-12)
        assert parts.task.item() == pytest.approx(full.task.item(), rel=1e-12)
