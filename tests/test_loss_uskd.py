import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import batch as make_batch, cross_entropy as np_ce, log_softmax as np_log_softmax, outputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "uskd_reference.json"


def _uskd(channels, classes, alpha=0.1, beta=0.1, mu=0.1, smoothing=0.1, shape=(1, 1)):
    from kd.losses.uskd import USKD
    return USKD(ce_weight=1.0, alpha=alpha, beta=beta, mu=mu, weak_label_smoothing=smoothing, feature="stage-2",
                feature_shapes={"student": {"stage-2": (channels, *shape)}}, num_classes=classes)


def paper_uskd(zs, features, weight, bias, y, eps):
    """Per-sample (target_i, non_target_i, weak_i) with loops, as the paper and the authors' code define them: the
    soft target S_y^2 + 1 - batch mean; Zipf weights 1/rank over the ranking score w_c / (1 - w_y + 1e-6) +
    log S_c / (1 - log S_y + 1e-6), renormalised without the label; the weak head's label-smoothed CE."""
    log_s = np_log_softmax(zs)
    pooled = features.reshape(len(zs), features.shape[1], -1).mean(2)
    log_w = np_log_softmax(pooled @ weight.T + bias)
    B, C = zs.shape
    confidence = np.array([math.exp(log_s[i, g]) ** 2 for i, g in enumerate(y)])
    soft_target = confidence + 1 - confidence.mean()
    target, non_target, weak = [], [], []
    for i, g in enumerate(y):
        target.append(-soft_target[i] * log_s[i, g])
        w = np.exp(log_w[i])
        score = [w[c] / (1 - w[g] + 1e-6) + log_s[i, c] / (1 - log_s[i, g] + 1e-6) for c in range(C)]
        order = sorted(range(C), key=lambda c: -score[c])
        zipf = {c: 1 / (order.index(c) + 1) for c in range(C) if c != g}
        total = sum(zipf.values())
        log_norm = math.log(sum(math.exp(zs[i, c]) for c in zipf))
        non_target.append(-sum(zipf[c] / total * (zs[i, c] - log_norm) for c in zipf))
        weak.append(-sum(((1 - eps) * (c == g) + eps / C) * log_w[i, c] for c in range(C)))
    return np.array(target), np.array(non_target), np.array(weak)


def test_uskd_against_the_papers_formula(logits_batch):
    zs, _, y = logits_batch
    loss = _uskd(channels=5, classes=10, alpha=0.7, beta=0.3, mu=0.2, smoothing=0.1, shape=(2, 3))
    features = torch.rand(6, 5, 2, 3, generator=torch.Generator().manual_seed(1))
    target, non_target, weak = paper_uskd(zs.numpy(), features.numpy(), loss.head.weight.detach().numpy(),
                                          loss.head.bias.detach().numpy(), y.numpy(), 0.1)
    parts = loss(outputs(zs, **{"stage-2": features}), None, make_batch(y))
    assert parts.terms["target"].item() == pytest.approx(target.mean(), rel=1e-10)
    assert parts.terms["non_target"].item() == pytest.approx(non_target.mean(), rel=1e-10)
    assert parts.terms["weak"].item() == pytest.approx(weak.mean(), rel=1e-10)
    assert parts.task.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-10)
    expected = 0.7 * target.mean() + 0.3 * non_target.mean() + 0.2 * weak.mean()
    assert parts.distillation.item() == pytest.approx(expected, rel=1e-10)


def fixture_inputs(recipe):
    """The seeded inputs the authors' code saw (tests/fixtures/uskd_reference.json, `inputs`)."""
    g = torch.Generator().manual_seed(recipe["seed"])
    rows, B, C = torch.arange(recipe["batch"]), recipe["batch"], recipe["classes"]
    y = torch.randint(C, (B,), generator=g)
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * recipe["scale"]
    zt[rows, y] += recipe["teacher_margin"]
    zs = torch.randn(B, C, generator=g, dtype=torch.float64) * recipe["scale"]
    zs[rows, y] += recipe["student_margin"]
    weights = torch.randn(B, C, generator=g, dtype=torch.float64)
    f = recipe["features"]
    features = torch.rand(B, f["channels"], generator=g, dtype=torch.float64) * f["feature_scale"]
    head_weight = torch.randn(C, f["channels"], generator=g, dtype=torch.float64) * f["weight_scale"]
    head_bias = torch.randn(C, generator=g, dtype=torch.float64) * f["bias_scale"]
    check = recipe["check"]
    assert zs.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert zt.sum().item() == pytest.approx(check["teacher_sum"], rel=1e-12)
    assert int(y.sum()) == check["labels_sum"] and y[:8].tolist() == check["first_labels"]
    return zs, y, weights, features, head_weight, head_bias


@pytest.mark.parametrize("case", ["cifar100", "imagenet"])
def test_uskd_matches_the_authors_code(case):
    """Fixture: USKDLoss of yzd-v/cls_KD on seeded float64 logits (64 x 100) and pooled features (64 x 32), its head
    set to the recipe's weights: value, and the gradients wrt the logits, the feature and the head."""
    reference = json.loads(FIXTURE.read_text())
    zs, y, weights, features, head_weight, head_bias = fixture_inputs(reference["inputs"])
    expected = reference["cases"][case]
    loss = _uskd(channels=features.shape[1], classes=zs.shape[1], alpha=expected["alpha"], beta=expected["beta"],
                 mu=expected["mu"])
    with torch.no_grad():
        loss.head.weight.copy_(head_weight)
        loss.head.bias.copy_(head_bias)
    z, f = zs.clone().requires_grad_(), features.clone().requires_grad_()
    parts = loss(outputs(z, **{"stage-2": f}), None, make_batch(y))
    assert parts.distillation.item() == pytest.approx(expected["value"], rel=1e-10)
    parts.distillation.backward()
    summary = expected["gradient_wrt_student_logits"]
    np.testing.assert_allclose(z.grad[0].numpy(), summary["first_row"], rtol=1e-9, atol=1e-15)
    assert z.grad.abs().sum().item() == pytest.approx(summary["abs_sum"], rel=1e-9)
    assert (z.grad**2).sum().item() == pytest.approx(summary["square_sum"], rel=1e-9)
    assert (z.grad * weights).sum().item() == pytest.approx(summary["weighted_sum"], rel=1e-9)
    np.testing.assert_allclose(f.grad[0].numpy(), expected["gradient_wrt_features"]["first_row"], rtol=1e-9)
    assert f.grad.abs().sum().item() == pytest.approx(expected["gradient_wrt_features"]["abs_sum"], rel=1e-9)
    head = expected["gradient_wrt_head"]
    assert loss.head.weight.grad.abs().sum().item() == pytest.approx(head["weight_abs_sum"], rel=1e-9)
    assert loss.head.bias.grad.abs().sum().item() == pytest.approx(head["bias_abs_sum"], rel=1e-9)


def test_without_the_weak_head_the_zipf_labels_follow_the_students_own_ranking(logits_batch):
    """A head that outputs a constant (w uniform) leaves the student's log-probabilities to rank the classes: the
    k-th largest non-target logit gets a weight proportional to 1 / k (the label ranked first here); the head and
    the feature then get gradient only from the weak term (mu)."""
    from kd.losses.nkd import label_mask
    from kd.losses.uskd import zipf_labels
    zs, _, y = logits_batch
    zs = zs.clone()
    zs[torch.arange(len(y)), y] = zs.max(1).values + 1.0
    weights = zipf_labels(torch.zeros_like(zs), torch.log_softmax(zs, 1), y)
    assert torch.all(weights[label_mask(zs, y)] == 0) and torch.allclose(weights.sum(1), torch.ones(len(y)))
    for i in range(len(y)):
        order = zs[i].argsort(descending=True)[1:]  # the non-target classes, largest logit first
        harmonic = sum(1 / k for k in range(2, zs.shape[1] + 1))
        assert torch.allclose(weights[i, order], 1 / torch.arange(2.0, zs.shape[1] + 1) / harmonic, rtol=1e-12)
    loss = _uskd(channels=4, classes=10, mu=0.0)
    f = torch.rand(6, 4, requires_grad=True)
    loss(outputs(zs, **{"stage-2": f}), None, make_batch(y)).total.backward()
    assert f.grad.abs().max() == 0 and loss.head.weight.grad.abs().max() == 0


def test_uskd_needs_no_teacher():
    from kd.losses.uskd import USKD
    assert USKD.needs_teacher is False
