import numpy as np
import pytest
import torch

from kd.losses.nst import NeuronSelectivityTransfer
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def block_mean(f, size):
    """Average over non-overlapping blocks: (n, C, H, W) -> (n, C, size, size)."""
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def reference_mmd(fs, ft):
    """Per image: the channel maps as unit vectors, biased MMD^2 with k(x, y) = (x . y)^2; mean over images."""
    size = min(fs.shape[-1], ft.shape[-1])
    fs, ft = block_mean(fs, size), block_mean(ft, size)
    values = []
    for s_img, t_img in zip(fs, ft):
        s = [c.ravel() / np.linalg.norm(c) for c in s_img]
        t = [c.ravel() / np.linalg.norm(c) for c in t_img]
        k = lambda xs, ys: np.mean([(x @ y) ** 2 for x in xs for y in ys])  # noqa: E731
        values.append(k(s, s) + k(t, t) - 2 * k(s, t))
    return np.mean(values)


def _nst(shapes):
    return NeuronSelectivityTransfer(weight=50.0, features=list(shapes["student"]), feature_shapes=shapes)


def test_nst_against_direct_loops_over_stages_of_different_sizes(logits_batch):
    zs, zt, y = logits_batch
    shapes = {"student": {"a": (8, 8, 8), "b": (16, 2, 2)}, "teacher": {"a": (12, 4, 4), "b": (6, 8, 8)}}
    student = {"a": torch.rand(6, 8, 8, 8), "b": torch.randn(6, 16, 2, 2)}
    teacher = {"a": torch.rand(6, 12, 4, 4), "b": torch.rand(6, 6, 8, 8)}
    expected = {name: reference_mmd(student[name].numpy(), teacher[name].numpy()) for name in ("a", "b")}
    total, terms = evaluate(_nst(shapes), outputs(zs, **student), outputs(zt, **teacher), y)
    assert terms["nst_a"].item() == pytest.approx(expected["a"], rel=1e-10)
    assert terms["nst_b"].item() == pytest.approx(expected["b"], rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 50 * (expected["a"] + expected["b"]), rel=1e-10)


def test_nst_invariances(logits_batch):
    zs, zt, y = logits_batch
    shapes = {"student": {"feat": (8, 4, 4)}, "teacher": {"feat": (5, 4, 4)}}
    loss = _nst(shapes)
    fs, ft = torch.randn(6, 8, 4, 4), torch.randn(6, 5, 4, 4)
    _, base = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    assert base["nst_feat"].item() > 0
    _, same = evaluate(loss, outputs(zs, feat=ft), outputs(zt, feat=ft), y)
    assert abs(same["nst_feat"].item()) < 1e-14  # zero for equal maps
    # channel permutation, per-channel positive scale and sign (d = 2) change no kernel value
    changed = fs[:, torch.randperm(8)] * (torch.rand(1, 8, 1, 1) + 0.1) * torch.tensor([1.0, -1] * 4).view(1, 8, 1, 1)
    _, moved = evaluate(loss, outputs(zs, feat=changed), outputs(zt, feat=ft), y)
    assert moved["nst_feat"].item() == pytest.approx(base["nst_feat"].item(), rel=1e-10)


def test_nst_needs_spatial_maps():
    shapes = {"student": {"embed": (128,)}, "teacher": {"embed": (512,)}}
    with pytest.raises(ValueError, match="must be a C x H x W map"):
        _nst(shapes)
