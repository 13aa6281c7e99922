import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "mgd_reference.json"


def _mgd(student_shape, teacher_shape, weight=7e-5, mask_ratio=0.15):
    from kd.losses.mgd import MGD
    torch.manual_seed(0)
    shapes = {"student": {"feat": tuple(student_shape)}, "teacher": {"feat": tuple(teacher_shape)}}
    return MGD(weight=weight, mask_ratio=mask_ratio, feature="feat", feature_shapes=shapes)


def np_conv3x3(x, w, b):
    """3x3 convolution, padding 1, as a sum over the nine offsets."""
    n, c, h, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, width)) + b.reshape(1, -1, 1, 1)
    for i in range(3):
        for j in range(3):
            out += np.einsum("oc,nchw->nohw", w[:, :, i, j], padded[:, :, i:i + h, j:j + width])
    return out


def np_mgd(loss, fs, ft, kept):
    """(1/N) sum (G(align(F_s) * M) - F_t)^2, written out: align by einsum, k x k block means to the teacher's size,
    the mask, two 3x3 convolutions with a ReLU between."""
    p = {name: t.detach().numpy() for name, t in loss.named_parameters()}
    s = fs.numpy()
    if "align.weight" in p:
        s = np.einsum("oc,nchw->nohw", p["align.weight"][:, :, 0, 0], s) + p["align.bias"].reshape(1, -1, 1, 1)
    k = s.shape[2] // ft.shape[2]
    if k > 1:
        n, c, h, w = s.shape
        s = s.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
    s = s * kept
    hidden = np.maximum(np_conv3x3(s, p["generation.0.weight"], p["generation.0.bias"]), 0)
    generated = np_conv3x3(hidden, p["generation.2.weight"], p["generation.2.bias"])
    return ((generated - ft.numpy()) ** 2).sum() / len(s)


def drawn_mask(loss, n, c, seed):
    torch.manual_seed(seed)
    return loss.mask(torch.empty(n, c, 1, 1)).numpy()


@pytest.mark.parametrize("student_shape,teacher_shape", [((8, 4, 4), (16, 4, 4)),   # channels differ: align conv
                                                         ((16, 8, 8), (16, 4, 4)),  # equal channels, pooled 8x8 -> 4x4
                                                         ((12, 4, 4), (6, 4, 4))])
def test_mgd_against_a_direct_computation(student_shape, teacher_shape):
    loss = _mgd(student_shape, teacher_shape)
    assert ("align.weight" in dict(loss.named_parameters())) == (student_shape[0] != teacher_shape[0])
    fs, ft = torch.randn(3, *student_shape), torch.rand(3, *teacher_shape)
    zs, y = torch.randn(3, 10), torch.tensor([0, 5, 9])
    kept = drawn_mask(loss, 3, teacher_shape[0], seed=7)
    assert 0 < kept.sum() < kept.size  # some channels masked, not all
    expected = np_mgd(loss, fs, ft, kept)
    torch.manual_seed(7)
    total, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    assert terms["mgd"].item() == pytest.approx(expected, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 7e-5 * expected, rel=1e-10)


def fixture_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    fs = torch.randn(recipe["batch"], *recipe["student_shape"], generator=g, dtype=torch.float64)
    ft = torch.randn(recipe["batch"], *recipe["teacher_shape"], generator=g, dtype=torch.float64).clamp_min(0)
    assert fs.sum().item() == pytest.approx(recipe["check"]["student_sum"], rel=1e-12)
    assert ft.sum().item() == pytest.approx(recipe["check"]["teacher_sum"], rel=1e-12)
    return fs, ft


def test_mgd_matches_the_authors_loss_on_seeded_inputs_weights_and_mask():
    """Fixture: MGDLoss of yzd-v/MGD (cls/mmcls/distillation/losses/mgd.py) on seeded float64 inputs, the same
    seeded weights, and the mask its torch.rand draws after the same seed: value and gradient."""
    reference = json.loads(FIXTURE.read_text())
    recipe = reference["inputs"]
    fs, ft = fixture_inputs(recipe)
    loss = _mgd(recipe["student_shape"], recipe["teacher_shape"], weight=recipe["alpha_mgd"],
                mask_ratio=recipe["lambda_mgd"])
    parameters = dict(loss.named_parameters())
    assert list(parameters) == list(recipe["parameters"])  # the authors' names: align, generation.0, generation.2
    g = torch.Generator().manual_seed(recipe["weight_seed"])
    with torch.no_grad():
        for name, shape in recipe["parameters"].items():
            parameters[name].copy_(torch.randn(shape, generator=g, dtype=torch.float64) * recipe["weight_scale"])
    kept = drawn_mask(loss, recipe["batch"], recipe["teacher_shape"][0], recipe["mask_seed"])
    assert kept.flatten().astype(int).tolist() == reference["kept_channels"]
    x = fs.clone().requires_grad_()
    torch.manual_seed(recipe["mask_seed"])
    _, terms = evaluate(loss, outputs(torch.zeros(recipe["batch"], 10), feat=x), outputs(None, feat=ft),
                        torch.zeros(recipe["batch"], dtype=torch.long))
    weighted = recipe["alpha_mgd"] * terms["mgd"]
    weighted.backward()
    assert weighted.item() == pytest.approx(reference["value"], rel=1e-12)
    expected = reference["gradient_wrt_student"]
    gradient = x.grad.flatten()
    assert gradient.sum().item() == pytest.approx(expected["sum"], rel=1e-9)
    assert gradient.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-12)
    np.testing.assert_allclose(gradient[:4].numpy(), expected["first"], rtol=1e-10)
    for index, value in expected["entries"].items():
        assert gradient[int(index)].item() == pytest.approx(value, rel=1e-10)


def test_the_mask_drops_each_channel_with_probability_mask_ratio_and_follows_the_seed():
    loss = _mgd((8, 2, 2), (64, 2, 2), mask_ratio=0.15)
    dropped = 1 - drawn_mask(loss, 4000, 64, seed=1)
    assert dropped.shape == (4000, 64, 1, 1) and set(np.unique(dropped)) == {0.0, 1.0}
    assert dropped.mean() == pytest.approx(0.15, abs=4 * (0.15 * 0.85 / dropped.size) ** 0.5)
    np.testing.assert_array_equal(drawn_mask(loss, 5, 64, seed=3), drawn_mask(loss, 5, 64, seed=3))
    assert drawn_mask(_mgd((8, 2, 2), (64, 2, 2), mask_ratio=0.0), 50, 64, seed=1).all()
    assert not drawn_mask(_mgd((8, 2, 2), (64, 2, 2), mask_ratio=1.0), 50, 64, seed=1).any()


def test_everything_masked_leaves_a_constant_generation_that_no_student_reaches():
    loss = _mgd((8, 4, 4), (16, 4, 4), mask_ratio=1.0)
    ft, zs, y = torch.rand(2, 16, 4, 4), torch.randn(2, 10), torch.tensor([1, 2])
    fs = torch.randn(2, 8, 4, 4, requires_grad=True)
    _, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    _, again = evaluate(loss, outputs(zs, feat=torch.randn(2, 8, 4, 4) * 10), outputs(zs, feat=ft), y)
    assert terms["mgd"].item() == pytest.approx(again["mgd"].item(), rel=1e-12)
    terms["mgd"].backward()
    assert fs.grad.abs().max().item() == 0.0


def test_nothing_masked_is_deterministic_and_zero_when_the_generator_reproduces_the_teacher():
    loss = _mgd((16, 4, 4), (16, 4, 4), mask_ratio=0.0)
    with torch.no_grad():  # generator = identity on non-negative maps: conv(ReLU(conv(x))) with centre taps of 1
        for conv in (loss.generation[0], loss.generation[2]):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(16)
            conv.bias.zero_()
    fs, zs, y = torch.rand(3, 16, 4, 4), torch.randn(3, 10), torch.tensor([0, 1, 2])
    _, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=fs.clone()), y)
    assert terms["mgd"].item() == 0.0


def test_scale_note_counts_the_teachers_values():
    note = _mgd((8, 4, 4), (64, 8, 8)).scale_note()
    assert "64x8x8 = 4096 values" in note and "0.163x" in note
