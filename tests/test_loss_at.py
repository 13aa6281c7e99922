import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "at_reference.json"


def np_block_mean(a, pool):
    """Average pooling by `pool` over the last two axes."""
    *lead, h, w = a.shape
    return a.reshape(*lead, h // pool, pool, w // pool, pool).mean((-3, -1))


def np_attention(f, pool, resize):
    """The paper's A(F) = normalize(mean_c F_c^2), with the larger map's features (or its map) pooled by `pool`."""
    f = f.numpy()
    if resize == "features" and pool > 1:
        f = np_block_mean(f, pool)
    a = (f ** 2).mean(1)  # N, H, W
    if resize == "maps" and pool > 1:
        a = np_block_mean(a, pool)
    a = a.reshape(len(a), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_at(student, teacher, resize="features", weight=250.0):
    from kd.losses.at import AttentionTransfer
    shapes = {"student": {"feat": student}, "teacher": {"feat": teacher}}
    return AttentionTransfer(weight=weight, feature="feat", resize=resize, feature_shapes=shapes)


@pytest.mark.parametrize("resize", ["features", "maps"])
def test_attention_transfer_same_and_different_sizes(logits_batch, resize):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    expected = np_ce(zs.numpy(), y.numpy()) + 250 * np.mean((np_attention(fs, 1, resize)
                                                             - np_attention(ft, 2, resize)) ** 2)
    loss = make_at((128, 4, 4), (64, 8, 8), resize)
    total, _ = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert "4x4 = 16 positions" in loss.scale_note() and "15.62" in loss.scale_note()


def fixture_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    fs = torch.randn(recipe["batch"], *recipe["student_shape"], generator=g, dtype=torch.float64)
    ft = torch.randn(recipe["batch"], *recipe["teacher_shape"], generator=g, dtype=torch.float64)
    check = recipe["check"]  # the inputs the reference saw
    assert fs.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert ft.sum().item() == pytest.approx(check["teacher_sum"], rel=1e-12)
    assert fs.flatten()[:4].tolist() == check["student_first"] and ft.flatten()[:4].tolist() == check["teacher_first"]
    return fs, ft


def at_value_and_gradient(loss, fs, ft):
    fs = fs.clone().requires_grad_()
    zeros, y = torch.zeros(len(fs), 10), torch.zeros(len(fs), dtype=torch.long)
    _, terms = evaluate(loss, outputs(zeros, feat=fs), outputs(zeros, feat=ft), y)
    terms["at"].backward()
    return terms["at"].item(), fs.grad.flatten().numpy()


def test_resize_features_matches_repdistillers_at_loss_on_64x8x8_vs_256x4x4():
    """Fixture: RepDistiller's Attention.at_loss (mdistiller's single_stage_at_loss gives the same) on seeded maps."""
    reference = json.loads(FIXTURE.read_text())
    fs, ft = fixture_inputs(reference["inputs"])
    expected_gradient = np.array(reference["gradient_wrt_student"])
    value, gradient = at_value_and_gradient(make_at((64, 8, 8), (256, 4, 4), "features"), fs, ft)
    assert value == pytest.approx(reference["value"], rel=1e-12)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-12 * np.abs(expected_gradient).max())
    # squaring before pooling is a different loss: 70% below the reference's value, gradient 92% off
    value, gradient = at_value_and_gradient(make_at((64, 8, 8), (256, 4, 4), "maps"), fs, ft)
    assert value == pytest.approx(0.304 * reference["value"], rel=1e-2)
    assert np.linalg.norm(gradient - expected_gradient) > 0.9 * np.linalg.norm(expected_gradient)


def test_attention_transfer_vanishes_for_identical_maps(logits_batch):
    zs, _, y = logits_batch
    f = torch.randn(6, 64, 8, 8)
    for resize in ("features", "maps"):
        loss = make_at((64, 8, 8), (64, 8, 8), resize)
        _, terms = evaluate(loss, outputs(zs, feat=f), outputs(zs, feat=f.clone()), y)
        assert terms["at"].item() < 1e-14


def test_an_unknown_resize_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"resize 'pool' is not one of \['features', 'maps'\]"):
        make_at((64, 8, 8), (64, 4, 4), "pool")
