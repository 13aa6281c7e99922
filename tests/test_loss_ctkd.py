import json
import math

import numpy as np
import pytest
import torch

from conftest import compose_config
from kd.losses.batch import Progress
from reference import (batch as make_batch, cross_entropy as np_ce, log_softmax as np_log_softmax, outputs,
                       scaled_logit_fixture_inputs, softmax as np_softmax)

pytestmark = pytest.mark.usefixtures("float64")
DEFAULTS = dict(t_start=1.0, t_range=20.0, theta_init=1.0, lambda_max=1.0, curriculum_fraction=10 / 240,
                ce_weight=0.1, kd_weight=0.9, standardize=False)


def _ctkd(**changes):
    from kd.losses.ctkd import CTKD
    return CTKD(**{**DEFAULTS, **changes})


def np_temperature(theta):
    return 1.0 + 20.0 / (1.0 + math.exp(-theta))


def np_zscore(z):
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


def np_loss(zs, zt, y, theta, standardize=False, weights=None, t_start=1.0, kd_weight=0.9):
    """0.1 CE + 0.9 tau^2 KL(p_t || p_s), written out per sample (the authors' run script's weights); standardize:
    the KL of the z-scored logits (the CE keeps the raw ones); weights: a factor per sample on the KL."""
    tau = t_start + np_temperature(theta) - 1.0
    ks, kt = (np_zscore(zs), np_zscore(zt)) if standardize else (zs, zt)
    w = np.ones(len(zs)) if weights is None else weights
    log_ps, log_pt = np_log_softmax(ks / tau), np_log_softmax(kt / tau)
    kl = np.mean([w[i] * sum(math.exp(log_pt[i, c]) * (log_pt[i, c] - log_ps[i, c]) for c in range(zs.shape[1]))
                  for i in range(len(zs))])
    return 0.1 * np_ce(zs, y) + kd_weight * tau * tau * kl, tau * tau * kl


def authors_lambda(epoch):
    """zhengli97/CTKD CosineDecay(max 0, min -1, loops 10).get_value(epoch), negated: epoch is 1-based."""
    i = min(max(epoch, 0), 10)
    return -(((math.cos(i * math.pi / 10) + 1.0) * 0.5) * (0 - (-1)) + (-1))


def test_loss_and_temperature_match_the_formula(logits_batch):
    zs, zt, y = logits_batch
    loss = _ctkd()
    parts = loss(outputs(zs), outputs(zt), make_batch(y))
    total, kd = np_loss(zs.numpy(), zt.numpy(), y.numpy(), 1.0)
    assert parts.total.item() == pytest.approx(total, rel=1e-10)
    assert parts.terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert parts.terms["temperature"].item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-12)  # 15.62
    assert parts.task.item() == pytest.approx(0.1 * np_ce(zs.numpy(), y.numpy()), rel=1e-10)
    assert parts.distillation.item() == pytest.approx(0.9 * kd, rel=1e-10)


@pytest.mark.parametrize("epoch,step,steps,epochs", [(0, 9, 10, 240), (4, 9, 10, 240), (0, 0, 3, 2), (0, 4, 10, 240)])
def test_theta_ascends_the_loss_with_the_curriculum_strength(logits_batch, epoch, step, steps, epochs):
    zs, zt, y = logits_batch
    theta = 0.3
    loss = _ctkd(theta_init=theta)
    progress = Progress(epoch, step, steps, epochs)
    loss(outputs(zs), outputs(zt), make_batch(y, progress=progress)).total.backward()
    h = 1e-6
    slope = (np_loss(zs.numpy(), zt.numpy(), y.numpy(), theta + h)[0]
             - np_loss(zs.numpy(), zt.numpy(), y.numpy(), theta - h)[0]) / (2 * h)
    t = epoch + (step + 1) / steps
    strength = 0.5 * (1 - math.cos(math.pi * min(1.0, t / (epochs * 10 / 240))))
    assert loss.theta.grad.item() == pytest.approx(-strength * slope, rel=1e-6, abs=1e-12)
    assert strength > 0  # the reversed gradient is never exactly zero once a step has been taken


def test_curriculum_equals_the_authors_at_every_epoch_end_and_scales_with_the_run():
    loss = _ctkd()
    for epoch in range(1, 16):  # end of epoch `epoch` of 240: the authors' per-epoch value
        assert loss.reversal_strength(Progress(epoch - 1, 99, 100, 240)) == pytest.approx(authors_lambda(epoch))
    assert authors_lambda(1) == pytest.approx(0.02447, abs=1e-5) and authors_lambda(10) == 1.0
    # 24 epochs: the same curve over the first epoch; half-way through it lambda is 1/2
    assert loss.reversal_strength(Progress(0, 49, 100, 24)) == pytest.approx(0.5)
    assert loss.reversal_strength(Progress(1, 0, 100, 24)) == 1.0
    assert loss.reversal_strength(None) == 1.0  # outside training: full strength
    assert _ctkd(lambda_max=0.5).reversal_strength(Progress(5, 0, 1, 10)) == 0.5


def test_the_student_gradient_is_plain_kd_at_the_current_temperature(logits_batch):
    zs, zt, y = logits_batch
    grads = []
    for progress in (Progress(0, 0, 100, 240), Progress(200, 0, 100, 240)):
        student = zs.clone().requires_grad_()
        _ctkd()(outputs(student), outputs(zt), make_batch(y, progress=progress)).total.backward()
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=0)


def test_no_distillation_and_no_push_on_theta_when_student_equals_teacher(logits_batch):
    zs, _, y = logits_batch
    loss = _ctkd()
    parts = loss(outputs(zs), outputs(zs.clone()), make_batch(y, progress=Progress(50, 0, 1, 240)))
    parts.total.backward()
    assert abs(parts.terms["kd"].item()) < 1e-12 and abs(loss.theta.grad.item()) < 1e-12


@pytest.mark.parametrize("theta", [-40.0, 0.0, 40.0])
def test_temperature_stays_between_t_start_and_t_start_plus_range(logits_batch, theta):
    zs, zt, y = logits_batch
    tau = _ctkd(theta_init=theta)(outputs(zs), outputs(zt), make_batch(y)).terms["temperature"].item()
    assert 1.0 <= tau <= 21.0


# ---------------------------------------------------------------- standardize (LS) and entropy_aware (EA-CTKD)

@pytest.mark.parametrize("theta", [1.0, -0.7])
def test_standardize_is_ctkd_on_z_scored_logits(logits_batch, theta):
    zs, zt, y = logits_batch
    parts = _ctkd(theta_init=theta, standardize=True)(outputs(zs), outputs(zt), make_batch(y))
    total, kd = np_loss(zs.numpy(), zt.numpy(), y.numpy(), theta, standardize=True)
    assert parts.terms["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert parts.total.item() == pytest.approx(total, rel=1e-9)
    assert parts.terms["ce"].item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-12)  # raw logits


def test_standardized_theta_still_ascends_the_loss(logits_batch):
    zs, zt, y = logits_batch
    loss = _ctkd(theta_init=0.3, standardize=True)
    loss(outputs(zs), outputs(zt), make_batch(y)).total.backward()  # no progress: full reversal strength
    h = 1e-4
    slope = (np_loss(zs.numpy(), zt.numpy(), y.numpy(), 0.3 + h, standardize=True)[0]
             - np_loss(zs.numpy(), zt.numpy(), y.numpy(), 0.3 - h, standardize=True)[0]) / (2 * h)
    assert loss.theta.grad.item() == pytest.approx(-slope, rel=1e-5)  # a small slope (1e-3): rounding in the difference


LS_CTKD_REFERENCE = {1.0: 0.9019805787566704, 2.0: 0.9019165651254387}
"""t_start -> tau^2 * KL at tau = t_start + 20 sigmoid(1): sunshangquan/logit-standardization-KD
@f6e5aa5172bad618e801163c3385322eea673754, CTKD/distiller_zoo/KD.py DistillKL_logit_stand()(y_s, y_t, tau), run
outside the project in float64 (torch 2.14.1) on tests/fixtures/mlkd_reference.json's inputs (8 x 10 logits)."""


@pytest.mark.parametrize("t_start", [1.0, 2.0])
def test_ctkd_ls_matches_the_ls_authors_distill_kl_logit_stand(t_start):
    from test_loss_mlkd import FIXTURE
    zs, zt, y = scaled_logit_fixture_inputs(json.loads(FIXTURE.read_text())["inputs"])
    parts = _ctkd(t_start=t_start, standardize=True, kd_weight=9.0)(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["temperature"].item() == pytest.approx(t_start + 20 / (1 + math.exp(-1)), rel=1e-12)
    assert parts.terms["kd"].item() == pytest.approx(LS_CTKD_REFERENCE[t_start], rel=1e-12)


def test_ctkd_ls_is_ctkd_with_the_ls_weights_and_floor():
    ctkd, ctkd_ls = (compose_config([f"method={m}"]).method.loss for m in ("ctkd", "ctkd_ls"))
    assert ctkd_ls.standardize and not ctkd.standardize
    assert (ctkd_ls.ce_weight, ctkd_ls.kd_weight, ctkd_ls.t_start, ctkd_ls.t_range) == (0.1, 9.0, 2.0, 20.0)
    for key in ("theta_init", "lambda_max", "curriculum_fraction"):
        assert ctkd_ls[key] == ctkd[key], key


def test_entropy_aware_weights_each_samples_kl_at_the_learned_temperature(logits_batch):
    zs, zt, y = logits_batch
    ps, pt = np_softmax(zs.numpy() / 3.0), np_softmax(zt.numpy() / 3.0)
    h_s, h_t = -(ps * np.log(ps)).sum(1), -(pt * np.log(pt)).sum(1)
    w = h_t * (1 + h_s / math.log(10)) / 2  # at T' = 3 whatever tau is
    for theta in (1.0, -2.0):
        loss = _ctkd(theta_init=theta, entropy_aware=True, entropy_temperature=3.0, entropy_bound=None)
        parts = loss(outputs(zs), outputs(zt), make_batch(y))
        total, kd = np_loss(zs.numpy(), zt.numpy(), y.numpy(), theta, weights=w)
        assert parts.terms["kd"].item() == pytest.approx(kd, rel=1e-10)
        assert parts.total.item() == pytest.approx(total, rel=1e-10)
        assert parts.terms["entropy_weight"].item() == pytest.approx(w.mean(), rel=1e-12)
        parts.total.backward()
        assert loss.theta.grad.item() != 0  # the temperature still learns against the weighted loss
