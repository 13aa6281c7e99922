"""Independent references for the loss tests: numpy forms of the paper formulas' building blocks, and
small constructors for what a loss receives."""
import numpy as np
import pytest
import torch
from torch import nn

from kd.losses.batch import Batch, Progress
from kd.taps import Outputs


def log_softmax(z, axis=1):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(z, axis=1):
    return np.exp(log_softmax(z, axis))


def cross_entropy(z, y):
    return -np.mean(log_softmax(z)[np.arange(len(y)), y])


def smooth_l1(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b))
    return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def outputs(logits, **features):
    return Outputs(logits, features)


def batch(labels, indices=None, progress: Progress | None = None) -> Batch:
    """What the trainer hands a loss besides the outputs (images are not read by losses)."""
    indices = torch.arange(len(labels)) if indices is None else indices
    return Batch(torch.empty(0), labels, indices, progress)


def evaluate(loss, student, teacher, labels, **batch_args):
    """(total, terms) of a loss call, as floats are compared in the tests."""
    parts = loss(student, teacher, batch(labels, **batch_args))
    return parts.total, parts.terms


def classifier_fixture_inputs(recipe):
    """A reference fixture's seeded inputs for a loss that applies classifiers to feature maps (CAT-KD, SDD): maps,
    classifier weights and biases, labels, checked against what the authors' code saw (the fixture's "recipe")."""
    g = torch.Generator().manual_seed(recipe["seed"])
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    batch, classes = recipe["batch"], recipe["classes"]
    student, teacher = recipe["student_shape"], recipe["teacher_shape"]
    f_s, f_t = randn(batch, *student), randn(batch, *teacher)
    w_s, b_s = randn(classes, student[0]) / student[0] ** 0.5, 0.1 * randn(classes)
    w_t, b_t = randn(classes, teacher[0]) / teacher[0] ** 0.5, 0.1 * randn(classes)
    labels = torch.randint(classes, (batch,), generator=g)
    check = recipe["check"]
    assert f_s.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert f_t.sum().item() == pytest.approx(check["teacher_sum"], rel=1e-12)
    assert f_s.flatten()[:3].tolist() == check["student_first"] and labels.tolist() == check["labels"]
    return f_s, f_t, w_s, b_s, w_t, b_t, labels


def assert_gradient_summary(gradient, expected, probe_seed):
    """A gradient against the fixture's summary of the reference's: sum, sum of magnitudes, first entries, and its dot
    product with a seeded random probe (any entry off moves it)."""
    flat = gradient.flatten()
    probe = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    scale = expected["abs_sum"]
    assert flat.abs().sum().item() == pytest.approx(scale, rel=1e-10)
    assert flat.sum().item() == pytest.approx(expected["sum"], rel=1e-9, abs=1e-12 * scale)
    assert (flat @ probe).item() == pytest.approx(expected["dot_probe"], rel=1e-9, abs=1e-12 * scale)
    np.testing.assert_allclose(flat[:6].numpy(), expected["first"], rtol=1e-9, atol=1e-12 * scale)


def logit_fixture_inputs(recipe):
    """A logit loss's seeded inputs as the authors' code saw them (a fixture's `inputs` recipe: NKD, RLD), checked."""
    g = torch.Generator().manual_seed(recipe["seed"])
    rows = torch.arange(recipe["batch"])
    y = torch.randint(recipe["classes"], (recipe["batch"],), generator=g)
    zt = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    zt[rows, y] += recipe["teacher_margin"]
    zs = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    zs[rows, y] += recipe["student_margin"]
    weights = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64)
    check = recipe["check"]
    assert zs.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert zt.sum().item() == pytest.approx(check["teacher_sum"], rel=1e-12)
    assert int(y.sum()) == check["labels_sum"] and y[:8].tolist() == check["first_labels"]
    return zs, zt, y, weights


class ClassifierHead(nn.Module):
    """What a loss reads of a network here: its classifier `fc`, with given weights."""

    def __init__(self, weight, bias):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight), self.fc.bias.copy_(bias)


def scaled_logit_fixture_inputs(recipe):
    """Seeded student and teacher logits (scaled normals) and labels, as the authors' code saw them (a fixture's
    `inputs` recipe: MLKD, EA-KD), checked."""
    g = torch.Generator().manual_seed(recipe["seed"])
    zs = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    zt = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    y = torch.randint(recipe["classes"], (recipe["batch"],), generator=g)
    check = recipe["check"]
    assert zs.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert zt.sum().item() == pytest.approx(check["teacher_sum"], rel=1e-12) and y.tolist() == check["labels"]
    return zs, zt, y
