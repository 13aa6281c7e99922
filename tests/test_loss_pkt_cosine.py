import math

import numpy as np
import pytest
import torch

from kd.losses.pkt import PKT
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def cosine_pkt(**kwargs):
    return PKT(temperature=None, weight=30000.0, feature="embed", kernel="cosine", **kwargs)


def reference_pkt(xs, xt, eps=1e-7):
    """Passalis & Tefas with loops: K_ij = (cos_ij + 1) / 2 (j = i included), rows normalised, mean over b^2 entries."""
    def probs(x):
        unit = [v / (np.sqrt(np.sum(v**2)) + eps) for v in x]
        rows = [np.array([(u @ w + 1) / 2 for w in unit]) for u in unit]
        return np.array([row / row.sum() for row in rows])

    ps, pt = probs(xs), probs(xt)
    b = len(xs)
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_cosine_pkt_against_direct_loops(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128), torch.rand(6, 64, 8, 8)  # a vector and a map (pooled) of different widths
    pkt = reference_pkt(fs.numpy(), ft.numpy().mean((2, 3)))
    total, terms = evaluate(cosine_pkt(), outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["pkt"].item() == pytest.approx(pkt, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 30000 * pkt, rel=1e-10)


@pytest.mark.parametrize("student,teacher,value", [
    # orthogonal student, parallel teacher: P_t = 1/2 everywhere, P_s rows (2/3, 1/3) and (1/3, 2/3);
    # each row's KL = 0.5 ln(0.75) + 0.5 ln(1.5), averaged over 4 entries
    ([[1, 0], [0, 1]], [[1, 0], [2, 0]], (0.5 * math.log(0.75) + 0.5 * math.log(1.5)) / 2),
    ([[1, 0], [0, 1], [1, 1]], [[1, 0], [2, 0], [1, 1]], 0.0111706),  # the research notes' 3-point value
])
def test_cosine_pkt_hand_made_cases(student, teacher, value):
    n = len(student)
    _, terms = evaluate(cosine_pkt(), outputs(torch.zeros(n, 10), embed=torch.tensor(student, dtype=torch.float64)),
                        outputs(torch.zeros(n, 10), embed=torch.tensor(teacher, dtype=torch.float64)), torch.arange(n))
    assert terms["pkt"].item() == pytest.approx(value, abs=1e-7)


def test_cosine_pkt_invariances(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 16), torch.randn(6, 32)
    loss = cosine_pkt()
    _, base = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert base["pkt"].item() > 0
    _, same = evaluate(loss, outputs(zs, embed=ft), outputs(zt, embed=ft), y)
    assert abs(same["pkt"].item()) < 1e-15
    scales = torch.rand(6, 1) + 0.5  # per-sample positive scale and a rotation keep every cosine
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    _, moved = evaluate(loss, outputs(zs, embed=scales * fs @ rotation), outputs(zt, embed=ft), y)
    assert moved["pkt"].item() == pytest.approx(base["pkt"].item(), rel=1e-6)  # up to the 1e-7 guard in the norms
    order = torch.randperm(6)
    _, permuted = evaluate(loss, outputs(zs, embed=fs[order]), outputs(zt, embed=ft[order]), y)
    assert permuted["pkt"].item() == pytest.approx(base["pkt"].item(), rel=1e-12)


def test_a_zero_vector_gives_a_finite_loss():
    fs = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    _, terms = evaluate(cosine_pkt(), outputs(torch.zeros(3, 10), embed=fs),
                        outputs(torch.zeros(3, 10), embed=torch.randn(3, 4)), torch.arange(3))
    assert math.isfinite(terms["pkt"].item())


def test_each_kernel_checks_its_temperature():
    with pytest.raises(ValueError, match="cosine kernel has none"):
        PKT(0.1, 30000.0, "embed", kernel="cosine")
    with pytest.raises(ValueError, match="softmax kernel needs a temperature"):
        PKT(None, 2.0, "feat", kernel="softmax")
    with pytest.raises(ValueError, match="not one of"):
        PKT(None, 2.0, "feat", kernel="gaussian")
