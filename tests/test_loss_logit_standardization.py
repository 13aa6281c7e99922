"""Logit standardisation (Sun et al., CVPR 2024): the z-score helper and VanillaKD's `standardize` switch (the DKD
form is checked in test_loss_dkd.py)."""
import math

import numpy as np
import pytest
import torch

from conftest import compose_config
from reference import batch as make_batch, cross_entropy as np_ce, evaluate, outputs, softmax as np_softmax

pytestmark = pytest.mark.usefixtures("float64")


def np_zscore(z):
    z = np.asarray(z)
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


def test_zscore_is_per_sample_with_bessels_std(logits_batch):
    from kd.losses.logit_standardization import zscore
    zs, _, _ = logits_batch
    np.testing.assert_allclose(zscore(zs).numpy(), np_zscore(zs.numpy()), rtol=1e-12, atol=1e-12)
    out = zscore(zs).numpy()
    np.testing.assert_allclose(out.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(1, ddof=1), 1, rtol=1e-6)  # 1 up to the 1e-7 in the denominator
    constant = zscore(torch.full((2, 5), 3.0))
    assert torch.equal(constant, torch.zeros(2, 5))  # no 0/0


def test_standardized_kd_against_the_formula(logits_batch):
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    T, alpha = 2.0, 0.9
    ps, pt = np_softmax(np_zscore(zs.numpy()) / T), np_softmax(np_zscore(zt.numpy()) / T)
    kl = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)])
    parts = VanillaKD(T, alpha, standardize=True)(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["kd"].item() == pytest.approx(T * T * kl, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(alpha * T * T * kl, rel=1e-10)
    assert parts.task.item() == pytest.approx((1 - alpha) * np_ce(zs.numpy(), y.numpy()), rel=1e-10)  # raw logits


def test_standardize_false_is_the_unchanged_vanilla_kd(logits_batch):
    from kd.losses.base import soft_kl
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    for dtype in (torch.float32, torch.float64):
        s, t = zs.to(dtype), zt.to(dtype)
        _, terms = evaluate(VanillaKD(4.0, 0.7, standardize=False), outputs(s), outputs(t), y)
        assert torch.equal(terms["kd"], 4.0**2 * soft_kl(s, t, 4.0))  # bit for bit the previous expression


def test_standardized_kd_ignores_each_samples_logit_scale_and_offset(logits_batch):
    from kd.losses.kd import VanillaKD
    zs, zt, y = logits_batch
    loss = VanillaKD(2.0, 0.9, standardize=True)
    _, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    g = torch.Generator().manual_seed(3)
    scale, shift = torch.rand(6, 1, generator=g) * 5 + 0.1, torch.randn(6, 1, generator=g) * 10
    _, moved = evaluate(loss, outputs(scale * zs + shift), outputs(zt), y)
    assert moved["kd"].item() == pytest.approx(terms["kd"].item(), rel=1e-6)  # exact but for the 1e-7 in Z
    _, matched = evaluate(loss, outputs(scale * zt + shift), outputs(zt), y)
    assert abs(matched["kd"].item()) < 1e-10  # any positive-affine image of the teacher's logits is a perfect match


def test_the_named_configs_switch_it_on():
    kd, kd_ls, dkd, dkd_ls = (compose_config([f"method={m}"]) for m in ("kd", "kd_ls", "dkd", "dkd_ls"))
    assert not kd.method.loss.standardize and not dkd.method.loss.standardize
    assert kd_ls.method.loss.standardize and dkd_ls.method.loss.standardize
    assert kd_ls.method.loss.temperature == dkd_ls.method.loss.temperature == 2.0
    # kd_ls: the authors' CE 0.1 + KD 9 (LS cfg.py at f6e5aa5), at the harness's optimiser
    assert (kd_ls.method.loss.ce_weight, kd_ls.method.loss.kd_weight) == (0.1, 9.0)
    assert kd_ls.optim == kd.optim


def test_weighted_kd_is_the_alpha_mix_scaled(logits_batch):
    from kd.losses.kd import VanillaKD, WeightedKD
    zs, zt, y = logits_batch
    mix = VanillaKD(2.0, 0.9, standardize=True)(outputs(zs), outputs(zt), make_batch(y))
    weighted = WeightedKD(2.0, 1.0, 9.0, standardize=True)(outputs(zs), outputs(zt), make_batch(y))
    assert weighted.total.item() == pytest.approx(10 * mix.total.item(), rel=1e-12)
    assert weighted.distillation.item() == pytest.approx(9 * weighted.terms["kd"].item(), rel=1e-12)


@pytest.mark.parametrize("base", ["kd", "dkd", "mlkd", "ctkd"])
def test_each_ls_config_is_its_method_with_the_switch_on(base):
    plain, standardized = (compose_config([f"method={m}"]).method.loss for m in (base, f"{base}_ls"))
    assert plain.standardize is False and standardized.standardize is True
    assert plain._target_ == standardized._target_ or (base, standardized._target_) == ("kd", "kd.losses.kd.WeightedKD")
