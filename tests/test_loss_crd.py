import numpy as np
import pytest
import torch

from kd.losses.crd import InBatchCRD
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_crd_equals_cross_entropy_over_the_similarity_matrix(logits_batch):
    zs, zt, y = logits_batch
    torch.manual_seed(2)
    shapes = {"student": {"feat": (128, 4, 4)}, "teacher": {"feat": (64, 8, 8)}}
    loss = InBatchCRD(tau=0.07, weight=1.0, head_width=128, embed_dim=128, feature="feat", feature_shapes=shapes)
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def embed(head, f):
        lin1, lin2 = head[0], head[2]
        h = np.maximum(f.numpy().mean((2, 3)) @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy(), 0)
        e = h @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    sim = embed(loss.student_head, fs) @ embed(loss.teacher_head, ft).T / 0.07
    crd = np_ce(sim, np.arange(6))
    total, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    assert terms["crd"].item() == pytest.approx(crd, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + crd, rel=1e-8)
