import math

import numpy as np
import pytest
import torch

from kd.losses.cc import CorrelationCongruence
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def _cc(student_width=16, teacher_width=8, embed_dim=4, order=2, weight=1.0):
    torch.manual_seed(5)
    shapes = {"student": {"embed": (student_width,)}, "teacher": {"embed": (teacher_width,)}}
    return CorrelationCongruence(weight=weight, gamma=0.4, order=order, embed_dim=embed_dim, feature="embed",
                                 feature_shapes=shapes)


def taylor_kernel(x, y, gamma, order):
    return math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * (x @ y) ** p for p in range(order + 1))


def reference_cc(loss, fs, ft, gamma=0.4, order=2):
    """Peng et al.'s correlation congruence in loops: unit embeddings, b x b kernel matrices, ||C_s - C_t||^2 / b^2"""
    w, b = loss.student_head.weight.detach().numpy(), loss.student_head.bias.detach().numpy()
    e_s = [(w @ x + b) / np.linalg.norm(w @ x + b) for x in fs]
    e_t = [x / np.linalg.norm(x) for x in ft]
    n = len(fs)
    return sum((taylor_kernel(e_s[i], e_s[j], gamma, order) - taylor_kernel(e_t[i], e_t[j], gamma, order)) ** 2
               for i in range(n) for j in range(n)) / n**2


def test_cc_against_direct_loops(logits_batch):
    zs, zt, y = logits_batch
    loss = _cc(weight=500.0)
    fs, ft = torch.randn(6, 16), torch.rand(6, 8, 2, 2)  # a vector and a map (pooled) of different widths
    cc = reference_cc(loss, fs.numpy(), ft.numpy().mean((2, 3)))
    total, terms = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["cc"].item() == pytest.approx(cc, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 500 * cc, rel=1e-10)


def test_the_expansion_tends_to_the_gaussian_kernel_of_unit_vectors(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 16), torch.randn(6, 8)
    loss = _cc(order=25)
    w, b = loss.student_head.weight.detach().numpy(), loss.student_head.bias.detach().numpy()
    e_s = [(w @ x + b) / np.linalg.norm(w @ x + b) for x in fs.numpy()]
    e_t = [x / np.linalg.norm(x) for x in ft.numpy()]
    gauss = lambda es: np.array([[math.exp(-0.4 * np.sum((u - v) ** 2)) for v in es] for u in es])  # noqa: E731
    exact = np.mean((gauss(e_s) - gauss(e_t)) ** 2)
    _, terms = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["cc"].item() == pytest.approx(exact, rel=1e-9)


def test_cc_vanishes_for_equal_embeddings_and_ignores_the_teachers_scales(logits_batch):
    zs, zt, y = logits_batch
    loss = _cc(student_width=8, teacher_width=8, embed_dim=8)
    with torch.no_grad():
        loss.student_head.weight.copy_(torch.eye(8))
        loss.student_head.bias.zero_()
    f = torch.randn(6, 8)
    _, same = evaluate(loss, outputs(zs, embed=f), outputs(zt, embed=f), y)
    assert same["cc"].item() < 1e-28
    other = torch.randn(6, 8)
    _, base = evaluate(loss, outputs(zs, embed=f), outputs(zt, embed=other), y)
    _, scaled = evaluate(loss, outputs(zs, embed=f), outputs(zt, embed=(torch.rand(6, 1) + 0.1) * other), y)
    assert base["cc"].item() > 0 and scaled["cc"].item() == pytest.approx(base["cc"].item(), rel=1e-10)


def test_a_collapsed_head_cannot_zero_the_loss(logits_batch):
    """A head mapping every image to one vector makes C_s constant (k(1)); C_t is the teacher's own and stays."""
    zs, zt, y = logits_batch
    loss = _cc()
    with torch.no_grad():
        loss.student_head.weight.zero_()
        loss.student_head.bias.fill_(1.0)
    ft = torch.randn(6, 8)
    e_t = ft.numpy() / np.linalg.norm(ft.numpy(), axis=1, keepdims=True)
    k_one = taylor_kernel(np.ones(1), np.ones(1), 0.4, 2)
    c_t = np.array([[taylor_kernel(u, v, 0.4, 2) for v in e_t] for u in e_t])
    _, terms = evaluate(loss, outputs(zs, embed=torch.randn(6, 16)), outputs(zt, embed=ft), y)
    assert terms["cc"].item() == pytest.approx(np.mean((k_one - c_t) ** 2), rel=1e-10) and terms["cc"].item() > 1e-3
