import math

import numpy as np
import pytest
import torch

from kd.losses.vid import VariationalInformationDistillation
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def block_mean(f, size):
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def _vid(shapes, init_variance=5.0):
    torch.manual_seed(3)
    return VariationalInformationDistillation(weight=1.0, init_variance=init_variance, eps=1e-5,
                                              features=list(shapes["student"]), feature_shapes=shapes)


def reference_nll(loss, index, fs, ft):
    """The Gaussian NLL of the teacher's map under the regressor's mean, with explicit numpy convolutions."""
    size = min(fs.shape[-1], ft.shape[-1])
    fs, ft = block_mean(fs, size), block_mean(ft, size)
    w1, w2, w3 = (conv.weight.detach().numpy()[:, :, 0, 0] for conv in loss.regressors[index][::2])
    h = np.maximum(np.einsum("oc,nchw->nohw", w1, fs), 0)
    h = np.maximum(np.einsum("oc,nchw->nohw", w2, h), 0)
    mu = np.einsum("oc,nchw->nohw", w3, h)
    var = np.log1p(np.exp(loss.log_scales[index].detach().numpy())) + 1e-5
    nll = 0.5 * ((ft - mu) ** 2 / var[None, :, None, None] + np.log(var)[None, :, None, None])
    return nll.mean()


def test_vid_against_direct_computation_with_student_or_teacher_pooled(logits_batch):
    zs, zt, y = logits_batch
    # stage a: the student's map is larger (pooled before the regressor); stage b: the teacher's is
    shapes = {"student": {"a": (4, 8, 8), "b": (6, 2, 2)}, "teacher": {"a": (5, 4, 4), "b": (3, 4, 4)}}
    loss = _vid(shapes)
    with torch.no_grad():
        for alpha in loss.log_scales:
            alpha.add_(torch.randn_like(alpha))  # channels with different variances
    student = {"a": torch.randn(6, 4, 8, 8), "b": torch.rand(6, 6, 2, 2)}
    teacher = {"a": torch.rand(6, 5, 4, 4), "b": torch.randn(6, 3, 4, 4)}
    expected = [reference_nll(loss, i, student[k].numpy(), teacher[k].numpy()) for i, k in enumerate("ab")]
    total, terms = evaluate(loss, outputs(zs, **student), outputs(zt, **teacher), y)
    assert terms["vid_a"].item() == pytest.approx(expected[0], rel=1e-10)
    assert terms["vid_b"].item() == pytest.approx(expected[1], rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + sum(expected), rel=1e-10)


def test_vid_starts_at_the_initial_variance_and_a_perfect_mean_leaves_half_its_log(logits_batch):
    zs, zt, y = logits_batch
    shapes = {"student": {"feat": (4, 4, 4)}, "teacher": {"feat": (4, 4, 4)}}
    loss = _vid(shapes)
    variance = torch.nn.functional.softplus(loss.log_scales[0]) + 1e-5
    assert torch.allclose(variance, torch.full((4,), 5.0), rtol=1e-12)
    with torch.no_grad():  # identity regressor; non-negative inputs make the ReLUs no-ops: mu = s
        for conv in loss.regressors[0][::2]:
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    f = torch.rand(6, 4, 4, 4)
    _, terms = evaluate(loss, outputs(zs, feat=f), outputs(zt, feat=f), y)
    assert terms["vid_feat"].item() == pytest.approx(0.5 * math.log(5.0), rel=1e-10)
    _, shifted = evaluate(loss, outputs(zs, feat=f), outputs(zt, feat=f + 1.0), y)
    assert shifted["vid_feat"].item() == pytest.approx(0.5 * (1 / 5.0 + math.log(5.0)), rel=1e-10)
    small = _vid(shapes, init_variance=0.01)  # a small variance with a close mean: the NLL without constant is < 0
    with torch.no_grad():
        for conv in small.regressors[0][::2]:
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    _, negative = evaluate(small, outputs(zs, feat=f), outputs(zt, feat=f), y)
    assert negative["vid_feat"].item() == pytest.approx(0.5 * math.log(0.01), rel=1e-8) and negative["vid_feat"] < 0


def test_vid_needs_spatial_maps():
    with pytest.raises(ValueError, match="must be a C x H x W map"):
        _vid({"student": {"embed": (128,)}, "teacher": {"embed": (64,)}})
