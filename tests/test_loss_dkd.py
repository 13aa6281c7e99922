import math

import numpy as np
import pytest
import torch

from reference import (batch as make_batch, cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs,
                       softmax as np_softmax)

pytestmark = pytest.mark.usefixtures("float64")


def paper_dkd(zs, zt, y, T):
    """Per-sample (TCKD_i, NCKD_i), T^2-scaled, from the paper: binary KL on [p_gt, 1 - p_gt], and KL of the
    non-target distributions renormalised after dropping the gt column."""
    ps, pt = np_softmax(np.asarray(zs) / T), np_softmax(np.asarray(zt) / T)
    tckd, nckd = [], []
    for i, g in enumerate(np.asarray(y)):
        bs, bt = [ps[i, g], 1 - ps[i, g]], [pt[i, g], 1 - pt[i, g]]
        tckd.append(T * T * sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2)))
        others = [c for c in range(ps.shape[1]) if c != g]
        hs, ht = ps[i, others] / ps[i, others].sum(), pt[i, others] / pt[i, others].sum()
        nckd.append(T * T * sum(ht[k] * math.log(ht[k] / hs[k]) for k in range(len(others))))
    return np.array(tckd), np.array(nckd)


def mdistiller_dkd(zs, zt, y, T, alpha, beta):
    """mdistiller's dkd_loss, literally: torch.log of the masked sums, and 1000 subtracted from the gt logit / T."""
    zs, zt = np.asarray(zs), np.asarray(zt)
    gt = np.zeros_like(zs, dtype=bool)
    gt[np.arange(len(y)), np.asarray(y)] = True
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() * T**2 / len(y)
    pt2, log_ps2 = np_softmax(zt / T - 1000.0 * gt), np_log_softmax(zs / T - 1000.0 * gt)
    xlogx = np.where(pt2 > 0, pt2 * np.log(np.where(pt2 > 0, pt2, 1.0)), 0.0)
    nckd = (xlogx - pt2 * log_ps2).sum() * T**2 / len(y)
    return alpha * tckd + beta * nckd


def _dkd(**overrides):
    from kd.losses.dkd import DKD
    args = dict(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_fraction=20 / 240, standardize=False)
    return DKD(**{**args, **overrides})


def test_dkd_against_the_papers_formula(logits_batch):
    zs, zt, y = logits_batch
    T, alpha, beta, ce_weight = 4.0, 0.5, 8.0, 0.7
    tckd, nckd = paper_dkd(zs.numpy(), zt.numpy(), y.numpy(), T)
    loss = _dkd(ce_weight=ce_weight, alpha=alpha, beta=beta, temperature=T)
    parts = loss(outputs(zs), outputs(zt), make_batch(y))  # no progress: outside training the warm-up factor is 1
    ce = np_ce(zs.numpy(), y.numpy())
    assert parts.terms["tckd"].item() == pytest.approx(tckd.mean(), rel=1e-10)
    assert parts.terms["nckd"].item() == pytest.approx(nckd.mean(), rel=1e-10)
    assert parts.terms["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert parts.task.item() == pytest.approx(ce_weight * ce, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(alpha * tckd.mean() + beta * nckd.mean(), rel=1e-10)


def test_dkd_equals_mdistillers_masking_where_that_is_finite(logits_batch):
    zs, zt, y = logits_batch
    total, terms = evaluate(_dkd(), outputs(zs), outputs(zt), y)
    expected = mdistiller_dkd(zs.numpy(), zt.numpy(), y.numpy(), 4.0, 1.0, 8.0)
    assert (total - terms["ce"]).item() == pytest.approx(expected, rel=1e-10)


def test_kd_decomposes_into_tckd_plus_weighted_nckd_per_sample(logits_batch):
    """KL(p_t || p_s) = TCKD + (1 - p_t,gt) * NCKD for each sample (the paper's Eq. 1), against VanillaKD's term."""
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    T = 4.0
    pt = np_softmax(zt.numpy() / T)
    for i in range(len(y)):
        row = slice(i, i + 1)
        _, dkd = evaluate(_dkd(temperature=T), outputs(zs[row]), outputs(zt[row]), y[row])
        _, kd = evaluate(VanillaKD(T, 0.5, False), outputs(zs[row]), outputs(zt[row]), y[row])
        p_gt = pt[i, y[i]]
        assert kd["kd"].item() == pytest.approx(dkd["tckd"].item() + (1 - p_gt) * dkd["nckd"].item(), rel=1e-10)


def test_dkd_invariants(logits_batch):
    zs, zt, y = logits_batch
    loss = _dkd()
    _, same = evaluate(loss, outputs(zs), outputs(zs.clone()), y)
    assert abs(same["tckd"].item()) < 1e-12 and abs(same["nckd"].item()) < 1e-12
    _, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    assert terms["tckd"].item() >= 0 and terms["nckd"].item() >= 0
    shift = torch.randn(len(y), 1) * 10  # a per-sample constant changes no softmax
    _, shifted = evaluate(loss, outputs(zs + shift), outputs(zt - shift), y)
    for name in ("tckd", "nckd"):
        assert shifted[name].item() == pytest.approx(terms[name].item(), rel=1e-10)


def test_the_warmup_scales_the_whole_dkd_term_and_not_the_label_loss(logits_batch):
    from kd.losses.batch import Progress
    zs, zt, y = logits_batch
    loss = _dkd()  # warm-up over 20/240 = 1/12 of the epochs, counted per step
    full = loss(outputs(zs), outputs(zt), make_batch(y))
    for epoch, step, steps, epochs, factor in [(0, 9, 10, 240, 1 / 20), (9, 9, 10, 240, 0.5), (19, 9, 10, 240, 1.0),
                                               (0, 4, 10, 240, 0.5 / 20), (30, 0, 10, 240, 1.0),
                                               (0, 4, 10, 24, 0.25), (0, 9, 10, 24, 0.5), (1, 9, 10, 24, 1.0),
                                               (0, 4, 10, 10, 0.6), (0, 9, 10, 10, 1.0), (3, 2, 10, 10, 1.0)]:
        parts = loss(outputs(zs), outputs(zt), make_batch(y, progress=Progress(epoch, step, steps, epochs)))
        assert parts.distillation.item() == pytest.approx(factor * full.distillation.item(), rel=1e-12)
        assert parts.task.item() == pytest.approx(full.task.item(), rel=1e-12)
        assert parts.terms["tckd"].item() == pytest.approx(full.terms["tckd"].item(), rel=1e-12)


def test_a_student_too_confident_for_mdistillers_log_stays_finite_and_exact():
    """A gt logit 1e4 above the rest: in float32 every other class's probability underflows to 0, so mdistiller's
    log of their sum is -inf, and its gt logit/T - 1000 still dominates, so its 'non-target' softmax is all gt.
    Here both stay right."""
    y = torch.tensor([2, 0])
    zs64 = torch.tensor([[0.0, 1.0, 1e4, 2.0], [3e3, -1.0, 0.5, 0.0]])
    zt64 = torch.tensor([[0.3, -0.2, 2.0, 0.1], [1.0, 0.2, -0.4, 0.0]])
    T = 4.0
    # the paper's quantities, in float64 and in log space
    log_ps, log_pt = np_log_softmax(zs64.numpy() / T), np_log_softmax(zt64.numpy() / T)
    tckd, nckd = [], []
    for i, g in enumerate(y.numpy()):
        others = [c for c in range(4) if c != g]
        log_bs = [log_ps[i, g], np.logaddexp.reduce(log_ps[i, others])]
        log_bt = [log_pt[i, g], np.logaddexp.reduce(log_pt[i, others])]
        tckd.append(sum(math.exp(log_bt[k]) * (log_bt[k] - log_bs[k]) for k in range(2)))
        hs, ht = log_ps[i, others] - log_bs[1], log_pt[i, others] - log_bt[1]
        nckd.append(float((np.exp(ht) * (ht - hs)).sum()))
    zs = zs64.float().requires_grad_(True)
    parts = _dkd(temperature=T)(outputs(zs), outputs(zt64.float()), make_batch(y))
    assert parts.terms["tckd"].item() == pytest.approx(T * T * np.mean(tckd), rel=1e-5)
    assert parts.terms["nckd"].item() == pytest.approx(T * T * np.mean(nckd), rel=1e-5)
    parts.total.backward()
    assert torch.isfinite(zs.grad).all()
    p_s = torch.softmax(zs.detach() / T, dim=1)
    assert torch.log(p_s[0].sum() - p_s[0, 2]) == float("-inf")  # what mdistiller's torch.log(pred_student) meets


def mdistiller_float32(zs, zt, y, T, alpha, beta):
    """mdistiller's dkd_loss written out in torch, float32: the log of the summed bins' probabilities."""
    gt = torch.zeros_like(zs).scatter_(1, y[:, None], 1.0)
    bins = lambda p: torch.stack([(p * gt).sum(1), (p * (1 - gt)).sum(1)], 1)  # noqa: E731
    bs, bt = bins(torch.softmax(zs / T, 1)), bins(torch.softmax(zt / T, 1))
    tckd = (bt * (torch.log(bt) - torch.log(bs))).sum() * T**2 / len(y)
    pt2 = torch.softmax(zt / T - 1000.0 * gt, 1)
    nckd = (torch.special.xlogy(pt2, pt2) - pt2 * torch.log_softmax(zs / T - 1000.0 * gt, 1)).sum() * T**2 / len(y)
    assert tckd.dtype == nckd.dtype == torch.float32
    return alpha * tckd + beta * nckd, torch.log(bs[:, 1])


@pytest.mark.parametrize("lead", [200.0, 600.0])
def test_mdistillers_log_meets_zero_only_once_every_other_probability_underflows(lead):
    """float32, T = 4: at a true-class logit of +200 p_gt rounds to 1, yet mdistiller's log of the summed other
    probabilities (about 9 e^-50) is finite and its loss equals ours; at +600 they underflow to 0 and it is inf."""
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(4, 10, generator=g).float(), torch.randn(4, 10, generator=g).float() * 2
    y = torch.tensor([2, 0, 7, 5])
    zs[torch.arange(4), y] = lead
    theirs, log_other = mdistiller_float32(zs, zt, y, 4.0, 1.0, 8.0)
    total, terms = evaluate(_dkd(), outputs(zs), outputs(zt), y)
    ours = total - terms["ce"]
    exact = mdistiller_dkd(zs.double().numpy(), zt.double().numpy(), y.numpy(), 4.0, 1.0, 8.0)  # float64: finite
    assert torch.all(torch.softmax(zs / 4.0, 1)[torch.arange(4), y] == 1.0)
    assert ours.item() == pytest.approx(exact, rel=1e-6)
    if lead == 200.0:
        assert torch.isfinite(log_other).all() and theirs.item() == pytest.approx(exact, rel=1e-6)
    else:
        assert torch.all(log_other == float("-inf")) and theirs.item() == float("inf")


def test_standardize_z_scores_both_logit_vectors_first(logits_batch):
    zs, zt, y = logits_batch
    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)
    T = 2.0
    tckd, nckd = paper_dkd(z(zs.numpy()), z(zt.numpy()), y.numpy(), T)
    parts = _dkd(alpha=9.0, beta=72.0, temperature=T, standardize=True)(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["tckd"].item() == pytest.approx(tckd.mean(), rel=1e-9)
    assert parts.terms["nckd"].item() == pytest.approx(nckd.mean(), rel=1e-9)
    assert parts.distillation.item() == pytest.approx(9 * tckd.mean() + 72 * nckd.mean(), rel=1e-9)
    assert parts.task.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-10)  # CE on the raw logits


def test_entropy_aware_weights_each_samples_tckd_and_nckd(logits_batch):
    """EA-DKD (the authors' DKD.py): mean_i w_i (alpha TCKD_i + beta NCKD_i), w_i = H_t,i (1 + H_s,i / H_ub) / 2 at
    T' = 3 on the raw logits; the warm-up scales the weighted term."""
    from kd.losses.batch import Progress
    zs, zt, y = logits_batch
    tckd, nckd = paper_dkd(zs.numpy(), zt.numpy(), y.numpy(), 4.0)
    qs, qt = np_softmax(zs.numpy() / 3.0), np_softmax(zt.numpy() / 3.0)
    h_s, h_t = -(qs * np.log(qs)).sum(1), -(qt * np.log(qt)).sum(1)
    w = h_t * (1 + h_s / 100.0) / 2
    loss = _dkd(entropy_aware=True, entropy_temperature=3.0, entropy_bound=100.0)
    parts = loss(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["tckd"].item() == pytest.approx(np.mean(w * tckd), rel=1e-10)
    assert parts.terms["nckd"].item() == pytest.approx(np.mean(w * nckd), rel=1e-10)
    assert parts.distillation.item() == pytest.approx(np.mean(w * (tckd + 8.0 * nckd)), rel=1e-10)
    assert parts.task.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-12)
    early = loss(outputs(zs), outputs(zt), make_batch(y, progress=Progress(0, 9, 10, 240)))
    assert early.distillation.item() == pytest.approx(parts.distillation.item() / 20, rel=1e-12)
