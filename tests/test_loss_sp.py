import math

import numpy as np
import pytest
import torch

from kd.losses.sp import SimilarityPreserving
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def reference_sp(fs, ft):
    """Tung & Mori's L_SP with explicit loops: G[i][j] = <q_i, q_j>, each row divided by its norm."""
    def gram(f):
        q = f.reshape(len(f), -1)
        g = np.array([[q[i] @ q[j] for j in range(len(q))] for i in range(len(q))])
        return np.array([row / max(np.sqrt(np.sum(row**2)), 1e-12) for row in g])

    b = len(fs)
    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_against_direct_loops(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 8, 4, 4), torch.rand(6, 16, 8, 8)  # any two shapes: only the batch must match
    sp = reference_sp(fs.numpy(), ft.numpy())
    total, terms = evaluate(SimilarityPreserving(weight=3000.0, feature="feat"), outputs(zs, feat=fs),
                            outputs(zt, feat=ft), y)
    assert terms["sp"].item() == pytest.approx(sp, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 3000 * sp, rel=1e-10)


def test_sp_hand_made_case():
    # orthogonal student rows, parallel teacher rows: G_s = I, G_t rows (1, 2)/sqrt(5); squares sum to 4 - 6/sqrt(5)
    zs, y = torch.zeros(2, 10), torch.tensor([0, 1])
    fs, ft = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    _, terms = evaluate(SimilarityPreserving(3000.0, "feat"), outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    assert terms["sp"].item() == pytest.approx((4 - 6 / math.sqrt(5)) / 4, rel=1e-12)


def test_sp_invariances(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 8, 4, 4), torch.randn(6, 16, 2, 2)
    loss = SimilarityPreserving(3000.0, "feat")
    _, base = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    _, same = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=fs), y)
    assert same["sp"].item() < 1e-24  # zero when the two maps are equal
    _, scaled = evaluate(loss, outputs(zs, feat=7.5 * fs), outputs(zt, feat=0.01 * ft), y)
    assert scaled["sp"].item() == pytest.approx(base["sp"].item(), rel=1e-10)  # one global scale per network
    rotation, _ = torch.linalg.qr(torch.randn(128, 128))  # any orthogonal map of the flattened vectors
    rotated = (fs.flatten(1) @ rotation).view_as(fs)
    _, turned = evaluate(loss, outputs(zs, feat=rotated), outputs(zt, feat=ft), y)
    assert turned["sp"].item() == pytest.approx(base["sp"].item(), rel=1e-10)
    per_sample = fs * torch.arange(1.0, 7.0).view(6, 1, 1, 1)
    _, rescaled = evaluate(loss, outputs(zs, feat=per_sample), outputs(zt, feat=ft), y)
    assert rescaled["sp"].item() != pytest.approx(base["sp"].item(), rel=1e-3)  # per-sample scales do change it
    assert 0 < base["sp"].item() <= 4 / 6  # each unit-norm row differs by at most 2


def test_sp_of_one_sample_is_zero():
    f = torch.randn(1, 4, 2, 2)
    _, terms = evaluate(SimilarityPreserving(3000.0, "feat"), outputs(torch.zeros(1, 10), feat=f),
                        outputs(torch.zeros(1, 10), feat=-f), torch.tensor([3]))
    assert terms["sp"].item() == 0
