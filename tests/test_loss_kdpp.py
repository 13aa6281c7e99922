import math

import numpy as np
import pytest
import torch

from kd.losses.base import Preparation
from kd.losses.batch import Batch, Progress
from reference import batch as make_batch, cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs

pytestmark = pytest.mark.usefixtures("float64")
NUM_CLASSES = 10


def _kdpp(student_dim=8, teacher_dim=8, **changes):
    from kd.losses.kdpp import KDPlusPlus
    torch.manual_seed(3)
    shapes = {"student": {"embed": (student_dim,)}, "teacher": {"embed": (teacher_dim,)}}
    args = dict(temperature=4.0, ce_weight=1.0, kd_weight=1.0, nd_weight=2.0, kd_ramp_fraction=20 / 240,
                dropout=0.5, feature="embed", feature_shapes=shapes, num_classes=NUM_CLASSES)
    return KDPlusPlus(**{**args, **changes})


def np_nd(fs, ft, means, labels):
    """The authors' DirectNormLoss.project_center, one sample at a time, averaged over the batch."""
    total = 0.0
    for s, t, y in zip(fs, ft, labels):
        e = means[y] / np.linalg.norm(means[y])
        total += 1 - np.dot(s, e) / max(np.linalg.norm(s), np.linalg.norm(t))
    return total / len(labels)


def np_kd(zs, zt, T=4.0):
    ps, pt = np.exp(np_log_softmax(zs / T)), np.exp(np_log_softmax(zt / T))
    return T * T * np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(zs.shape[1]))
                            for i in range(len(zs))])


def preparation(batches):
    """A Preparation whose epoch 0 is `batches` [(labels, teacher embeddings)]; other epochs must not be read."""
    def epoch(e):
        assert e == 0
        for labels, embeddings in batches:
            yield Batch(torch.empty(0), labels, torch.arange(len(labels))), outputs(torch.zeros(len(labels), 10),
                                                                                     embed=embeddings)
    return Preparation(student=None, batches=epoch, autocast=None, log=lambda message: None)


def test_prepare_averages_the_teachers_embeddings_per_label():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(NUM_CLASSES, (7,), generator=g), torch.rand(7, 8, generator=g)) for _ in range(4)]
    loss = _kdpp()
    loss.prepare(preparation(batches))
    labels = torch.cat([b[0] for b in batches]).numpy()
    embeddings = torch.cat([b[1] for b in batches]).numpy()
    for c in range(NUM_CLASSES):
        expected = embeddings[labels == c].mean(0) if (labels == c).any() else np.zeros(8)
        assert np.allclose(loss.class_means[c].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_kdpp_against_the_authors_formula(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 8), torch.rand(6, 8) * 3
    means = torch.rand(NUM_CLASSES, 8)
    loss = _kdpp()
    loss.class_means.copy_(means)
    nd = np_nd(fs.numpy(), ft.numpy(), means.numpy(), y.numpy())
    kd = np_kd(zs.numpy(), zt.numpy())
    total, terms = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["nd"].item() == pytest.approx(nd, rel=1e-10)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + kd + 2.0 * nd, rel=1e-10)


def test_kd_ramps_over_20_of_240_epochs_and_nd_does_not(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 8), torch.rand(6, 8)
    loss = _kdpp()
    loss.class_means.copy_(torch.rand(NUM_CLASSES, 8))
    ce = np_ce(zs.numpy(), y.numpy())
    for progress, factor in [(Progress(0, 9, 10, 240), 1 / 20), (Progress(9, 9, 10, 240), 0.5),
                             (Progress(19, 9, 10, 240), 1.0), (Progress(100, 0, 10, 240), 1.0),
                             (Progress(0, 4, 10, 12), 0.5), (Progress(0, 0, 4, 2), 1.0)]:
        parts = loss(outputs(zs, embed=fs), outputs(zt, embed=ft), make_batch(y, progress=progress))
        expected = factor * parts.terms["kd"].item() + 2.0 * parts.terms["nd"].item()
        assert parts.distillation.item() == pytest.approx(expected, rel=1e-12), progress
        assert parts.task.item() == pytest.approx(ce, rel=1e-12)


def test_nd_hand_made_cases_and_invariances():
    loss = _kdpp()
    centre = torch.tensor([3.0, 4.0, 0, 0, 0, 0, 0, 0])
    loss.class_means[2] = centre
    unit = centre / 5
    y = torch.tensor([2])
    ft = torch.tensor([[0, 0, 2.0, 0, 0, 0, 0, 0]])  # norm 2

    def nd(fs, ft=ft):
        return evaluate(loss, outputs(torch.zeros(1, 10), embed=fs), outputs(torch.zeros(1, 10), embed=ft), y)[1]["nd"].item()
    assert nd((2 * 2 * unit)[None]) == pytest.approx(0.0, abs=1e-15)   # aligned, twice the teacher's norm
    assert nd((0.5 * 2 * unit)[None]) == pytest.approx(0.5)           # aligned, half the teacher's norm
    assert nd((-3 * unit)[None]) == pytest.approx(2.0)                # opposite, larger than the teacher's norm
    fs = torch.randn(1, 8)
    assert nd(5 * fs, 5 * ft) == pytest.approx(nd(fs, ft), rel=1e-12)  # jointly scaling both embeddings
    before = nd(fs)
    loss.class_means[2] = 7 * centre  # only the class mean's direction counts
    assert nd(fs) == pytest.approx(before, rel=1e-12)
    assert 0 <= nd(fs) <= 2


def test_a_projector_maps_the_student_to_the_teacher_width_when_they_differ(logits_batch):
    zs, zt, y = logits_batch
    loss = _kdpp(student_dim=5, teacher_dim=8).eval()  # eval: no dropout, BatchNorm at its running statistics
    assert isinstance(_kdpp().projector, torch.nn.Identity)
    linear = loss.projector[2]
    assert torch.equal(linear.bias, torch.zeros(8))
    with torch.no_grad():
        linear.bias.normal_()
    means = torch.rand(NUM_CLASSES, 8)
    loss.class_means.copy_(means)
    fs, ft = torch.randn(6, 5), torch.rand(6, 8)
    projected = (fs.numpy() / math.sqrt(1 + 1e-5)) @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
    _, terms = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["nd"].item() == pytest.approx(np_nd(projected, ft.numpy(), means.numpy(), y.numpy()), rel=1e-10)


def test_a_one_sample_training_batch_uses_the_running_statistics(logits_batch):
    zs, zt, y = logits_batch
    loss = _kdpp(student_dim=5, teacher_dim=8, dropout=0.0)
    loss.class_means.copy_(torch.rand(NUM_CLASSES, 8))
    fs, ft = torch.randn(1, 5), torch.rand(1, 8)
    _, training = evaluate(loss, outputs(zs[:1], embed=fs), outputs(zt[:1], embed=ft), y[:1])
    _, evaluation = evaluate(loss.eval(), outputs(zs[:1], embed=fs), outputs(zt[:1], embed=ft), y[:1])
    assert training["nd"].item() == pytest.approx(evaluation["nd"].item(), rel=1e-12)


def test_without_preparation_a_class_uses_its_mean_in_the_batch(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 8), torch.rand(6, 8)
    batch_means = np.zeros((NUM_CLASSES, 8))
    for c in set(y.tolist()):
        batch_means[c] = ft.numpy()[y.numpy() == c].mean(0)
    _, terms = evaluate(_kdpp(), outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    assert terms["nd"].item() == pytest.approx(np_nd(fs.numpy(), ft.numpy(), batch_means, y.numpy()), rel=1e-10)
