import math

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def _fitnet():
    from kd.losses.fitnet import FitNet
    torch.manual_seed(1)
    shapes = {"student": {"feat": (8, 4, 4)}, "teacher": {"feat": (6, 8, 8)}}
    return FitNet(weight=50.0, ramp_fraction=0.5, feature="feat", feature_shapes=shapes).eval()  # BN: running stats


def test_fitnet_against_direct_projection():
    from kd.losses.batch import Progress
    loss = _fitnet()
    fs, ft = torch.randn(3, 8, 4, 4), torch.rand(3, 6, 8, 8)
    zs, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    w = loss.projector[0].weight.detach().numpy()[:, :, 0, 0]  # (6, 8)
    proj = np.maximum(np.einsum("oc,nchw->nohw", w, fs.numpy()) / math.sqrt(1 + 1e-5), 0)
    proj = proj.repeat(2, axis=2).repeat(2, axis=3)  # adaptive average pooling 4x4 -> 8x8 replicates
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    hint = np.mean((unit(proj) - unit(ft.numpy())) ** 2)
    # the weight after t epochs of training (t counted per step): weight * min(1, t / (0.5 * epochs))
    for epoch, step, steps, epochs, factor in [(0, 9, 10, 10, 0.2), (2, 9, 10, 10, 0.6), (4, 9, 10, 10, 1.0),
                                               (9, 9, 10, 10, 1.0), (0, 4, 5, 3, 2 / 3), (1, 4, 5, 3, 1.0),
                                               (0, 1, 5, 1, 0.8), (0, 4, 5, 1, 1.0), (2, 4, 5, 7, 3 / 3.5),
                                               (3, 4, 5, 7, 1.0), (1, 4, 5, 7, 2 / 3.5)]:
        total, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y,
                                progress=Progress(epoch, step, steps, epochs))
        assert terms["hint"].item() == pytest.approx(hint, rel=1e-8)
        assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 50 * factor * hint, rel=1e-8), (epoch, epochs)


def test_fitnet_distance_vanishes_for_identical_normalised_maps(logits_batch):
    from kd.losses.fitnet import FitNet
    zs, _, y = logits_batch
    f = torch.randn(6, 64, 8, 8)
    shapes = {"student": {"feat": (64, 8, 8)}, "teacher": {"feat": (64, 8, 8)}}
    fitnet = FitNet(50.0, 0.5, "feat", shapes).eval()
    projected = fitnet.projector(f).detach()
    _, terms = evaluate(fitnet, outputs(zs, feat=f), outputs(zs, feat=3.0 * projected), y)  # same up to scale
    assert terms["hint"].item() < 1e-14


def test_fitnet_scale_note_names_the_teachers_channels():
    assert "6 channels" in _fitnet().scale_note() and "8.333" in _fitnet().scale_note()
