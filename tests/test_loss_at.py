import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def test_attention_transfer_same_and_different_sizes(logits_batch):
    from kd.losses.at import AttentionTransfer
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def att(f, pool):
        a = (f.numpy() ** 2).mean(1)  # N, H, W
        if pool > 1:
            n, h, w = a.shape
            a = a.reshape(n, h // pool, pool, w // pool, pool).mean((2, 4))
        a = a.reshape(len(a), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = np_ce(zs.numpy(), y.numpy()) + 250 * np.mean((att(fs, 1) - att(ft, 2)) ** 2)
    shapes = {"student": {"feat": (128, 4, 4)}, "teacher": {"feat": (64, 8, 8)}}
    loss = AttentionTransfer(weight=250.0, feature="feat", feature_shapes=shapes)
    total, _ = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert "4x4 = 16 positions" in loss.scale_note() and "15.62" in loss.scale_note()


def test_attention_transfer_vanishes_for_identical_maps(logits_batch):
    from kd.losses.at import AttentionTransfer
    zs, _, y = logits_batch
    f = torch.randn(6, 64, 8, 8)
    shapes = {"student": {"feat": (64, 8, 8)}, "teacher": {"feat": (64, 8, 8)}}
    _, terms = evaluate(AttentionTransfer(250.0, "feat", shapes), outputs(zs, feat=f), outputs(zs, feat=f.clone()), y)
    assert terms["at"].item() < 1e-14
