"""Independent references for the loss tests: numpy forms of the paper formulas' building blocks, and
small constructors for what a loss receives."""
import numpy as np
import torch

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
