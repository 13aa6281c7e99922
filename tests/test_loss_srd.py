import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import batch, cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs
from reference import softmax as np_softmax

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "srd_reference.json"


def _srd(student_dim, teacher_dim, weight=2.0, exponent=4.0, eps=1e-4, kd_weight=1.0, temperature=1.0):
    from kd.losses.srd import SRD
    torch.manual_seed(0)
    shapes = {"student": {"embed": (student_dim,)}, "teacher": {"embed": (teacher_dim,)}}
    return SRD(weight=weight, exponent=exponent, eps=eps, kd_weight=kd_weight, temperature=temperature,
               feature="embed", feature_shapes=shapes)


def np_srd(loss, es, et, zs, zt, y, weight, exponent, eps, kd_weight, T):
    """The recipe written out with loops over the batch and the dimensions."""
    W, b = loss.projector.weight.detach().numpy(), loss.projector.bias.detach().numpy()
    ps = es @ W.T + b
    B, D = ps.shape

    def batchnorm(a):  # batch statistics, biased variance, no affine
        out = np.empty_like(a)
        for j in range(D):
            mean = sum(a[i, j] for i in range(B)) / B
            var = sum((a[i, j] - mean) ** 2 for i in range(B)) / B
            for i in range(B):
                out[i, j] = (a[i, j] - mean) / math.sqrt(var + eps)
        return out
    s, t = batchnorm(ps), batchnorm(et)
    rep = math.log(sum(abs(s[i, j] - t[i, j]) ** exponent for i in range(B) for j in range(D)))
    pt, ls, lt = np_softmax(zt / T), np_log_softmax(zs / T), np_log_softmax(zt / T)
    kd = T * T * sum(pt[i, c] * (lt[i, c] - ls[i, c]) for i in range(B) for c in range(zs.shape[1])) / B
    return rep, kd, np_ce(zs, y) + weight * rep + kd_weight * kd


@pytest.mark.parametrize("exponent,eps,T,dims", [(4.0, 1e-4, 1.0, (6, 5)), (2.0, 1e-9, 4.0, (5, 5)),
                                                 (3.0, 1e-2, 2.0, (4, 7))])
def test_srd_against_loops(exponent, eps, T, dims):
    loss = _srd(*dims, weight=1.5, exponent=exponent, eps=eps, kd_weight=0.7, temperature=T)
    es, et = torch.randn(5, dims[0]), torch.rand(5, dims[1]) * 3
    zs, zt, y = torch.randn(5, 10) * 2, torch.randn(5, 10) * 2, torch.tensor([0, 3, 3, 7, 9])
    rep, kd, total = np_srd(loss, es.numpy(), et.numpy(), zs.numpy(), zt.numpy(), y.numpy(), 1.5, exponent, eps, 0.7, T)
    got_total, terms = evaluate(loss, outputs(zs, embed=es), outputs(zt, embed=et), y)
    assert terms["srd"].item() == pytest.approx(rep, rel=1e-10)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert got_total.item() == pytest.approx(total, rel=1e-10)


def test_a_feature_map_is_pooled_to_its_embedding():
    loss = _srd(8, 6)
    fs, ft = torch.randn(4, 8, 3, 3), torch.rand(4, 6, 2, 2)
    zs, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    _, pooled = evaluate(loss, outputs(zs, embed=fs), outputs(zs, embed=ft), y)
    _, flat = evaluate(loss, outputs(zs, embed=fs.mean((2, 3))), outputs(zs, embed=ft.mean((2, 3))), y)
    assert pooled["srd"].item() == pytest.approx(flat["srd"].item(), rel=1e-12)


def fixture_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    fs = torch.randn(recipe["batch"], *recipe["student_shape"], generator=g, dtype=torch.float64).clamp_min(0)
    ft = torch.randn(recipe["batch"], *recipe["teacher_shape"], generator=g, dtype=torch.float64).clamp_min(0)
    zs = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["logit_scale"]
    zt = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["logit_scale"]
    check = recipe["check"]
    for tensor, key in ((fs, "student_sum"), (ft, "teacher_sum"), (zs, "student_logits_sum"),
                        (zt, "teacher_logits_sum")):
        assert tensor.sum().item() == pytest.approx(check[key], rel=1e-12), key
    return fs, ft, zs, zt


def test_srd_matches_the_authors_released_loss():
    """Fixture: OurDistillationLoss of roymiles/Simple-Recipe-Distillation (imagenet/torchdistill/losses/single.py) on
    seeded float64 ResNet-18-width maps and logits, with the same seeded projector: the distillation part (their
    return value), its log-sum term, and the gradients wrt the student's map (pooled here to the tapped embedding)
    and logits."""
    reference = json.loads(FIXTURE.read_text())
    recipe = reference["inputs"]
    fs, ft, zs, zt = fixture_inputs(recipe)
    loss = _srd(recipe["student_shape"][0], recipe["teacher_shape"][0])
    g = torch.Generator().manual_seed(recipe["weight_seed"])
    with torch.no_grad():
        for (name, shape), parameter in zip(recipe["parameters"].items(), (loss.projector.weight, loss.projector.bias)):
            assert name.startswith("embed.") and list(parameter.shape) == shape  # their projector is `embed`
            parameter.copy_(torch.randn(shape, generator=g, dtype=torch.float64) * recipe["weight_scale"])
    x, z = fs.clone().requires_grad_(), zs.clone().requires_grad_()
    y = torch.zeros(recipe["batch"], dtype=torch.long)
    parts = loss(outputs(z, embed=x.mean(-1).mean(-1)), outputs(zt, embed=ft.mean(-1).mean(-1)),
                 batch(y))
    parts.distillation.backward()
    assert parts.distillation.item() == pytest.approx(reference["value"], rel=1e-12)
    assert parts.terms["srd"].item() == pytest.approx(reference["representation"], rel=1e-12)
    for gradient, expected in ((x.grad.flatten(), reference["gradient_wrt_student"]),
                               (z.grad.flatten(), reference["gradient_wrt_student_logits"])):
        scale = expected["abs_sum"]
        assert gradient.sum().item() == pytest.approx(expected["sum"], abs=1e-12 * scale)  # ~0: BN centres the batch
        assert gradient.abs().sum().item() == pytest.approx(scale, rel=1e-10)
        np.testing.assert_allclose(gradient[:4].numpy(), expected["first"], rtol=1e-9)
        for index, value in expected["entries"].items():
            assert gradient[int(index)].item() == pytest.approx(value, rel=1e-9)


def test_the_term_ignores_how_each_teacher_dimension_is_scaled_and_shifted():
    loss = _srd(6, 4, eps=1e-12)
    es, et = torch.randn(8, 6), torch.randn(8, 4)
    zs, y = torch.randn(8, 10), torch.arange(8)
    scale, shift = torch.tensor([0.1, 1.0, 7.0, 300.0]), torch.tensor([-5.0, 0.0, 2.0, 1e3])
    _, plain = evaluate(loss, outputs(zs, embed=es), outputs(zs, embed=et), y)
    _, moved = evaluate(loss, outputs(zs, embed=es), outputs(zs, embed=et * scale + shift), y)
    assert moved["srd"].item() == pytest.approx(plain["srd"].item(), rel=1e-9)


def test_identical_normalised_embeddings_give_minus_infinity_as_the_released_loss():
    loss = _srd(4, 4)
    with torch.no_grad():
        loss.projector.weight.copy_(torch.eye(4))
        loss.projector.bias.zero_()
    e, zs, y = torch.randn(6, 4), torch.randn(6, 10), torch.arange(6)
    _, terms = evaluate(loss, outputs(zs, embed=e), outputs(zs, embed=e.clone()), y)
    assert terms["srd"].item() == -math.inf


def test_a_batch_of_one_is_normalised_with_the_running_statistics():
    loss = _srd(5, 3)
    es, et, zs, y = torch.randn(1, 5), torch.randn(1, 3), torch.randn(1, 10), torch.tensor([2])
    _, terms = evaluate(loss, outputs(zs, embed=es), outputs(zs, embed=et), y)
    ps = loss.projector(es).detach()
    expected = math.log(((ps / math.sqrt(1 + 1e-4) - et / math.sqrt(1 + 1e-4)).abs() ** 4).sum().item())
    assert terms["srd"].item() == pytest.approx(expected, rel=1e-10)
