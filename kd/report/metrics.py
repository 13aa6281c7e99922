"""Per-model numbers from test-set logits and embeddings: quality, calibration, per-class accuracy, and closeness
to the teacher (predictions, logits, and linear CKA of the embeddings).

Every column the report shows per model is declared once, in `METRICS`: its name, how its value is found, which
way is better (if any), whether it is ranked, and its number format. The tables, ranks and markdown derive from it.

Calibration has one binning, used by the ECE and the reliability diagram alike: `ECE_BINS` equal-width bins of
the top-class confidence, bin i = (i/B, (i+1)/B], so a confidence of exactly 1.0 is in the top bin and one exactly
on an edge in the bin below it. (torchmetrics' calibration error bins [lo, hi) and puts 1.0 into an extra bin.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix

ECE_BINS = 10  # equal-width confidence bins, as the original notebook used


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin (i/B, (i+1)/B]: sample count, summed confidence, number correct. Sums, so seeds pool by
    adding."""
    confidence, predicted = probs.double().max(1)
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64) / n_bins  # exactly i/B, as written above
    bins = torch.bucketize(confidence, upper.to(confidence.device), right=False).clamp(max=n_bins - 1).cpu()
    confidence, correct = confidence.cpu(), (predicted == labels).double().cpu()
    return {"count": torch.bincount(bins, minlength=n_bins).tolist(),
            "confidence": torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence).tolist(),
            "correct": torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct).tolist()}


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    return calibration_bins(logits.double().softmax(1), labels, n_bins)


def expected_calibration_error(bins: dict[str, list]) -> float:
    """sum over non-empty bins of (count / N) * |accuracy - mean confidence|."""
    count, conf, correct = (torch.tensor(bins[k], dtype=torch.float64) for k in ("count", "confidence", "correct"))
    used = count > 0
    return ((correct[used] - conf[used]).abs().sum() / count.sum()).item()


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts, rows = true class, columns = predicted class (torchmetrics). Counts, so seeds pool by adding."""
    return multiclass_confusion_matrix(logits.argmax(1), labels, logits.shape[1]).cpu()


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Each class's accuracy (recall): the diagonal over the row sums; NaN for a class with no test images."""
    matrix = matrix.double()
    return matrix.diagonal() / matrix.sum(1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two sets of features of the same n samples (n x d1, n x d2):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc centred over samples. 1 for the same features up to
    an orthogonal transform and isotropic scaling; the widths may differ."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())).item()


@dataclass(frozen=True)
class Outputs:
    """What a metric is computed from: one model's test-set logits (and embeddings) beside its teacher's."""
    logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor
    embed: torch.Tensor | None = None
    teacher_embed: torch.Tensor | None = None


def accuracy(o: Outputs) -> float:
    return (o.logits.argmax(1) == o.labels).double().mean().item()


def cross_entropy(o: Outputs) -> float:
    return F.cross_entropy(o.logits.double(), o.labels).item()


def calibration_error(o: Outputs) -> float:
    return expected_calibration_error(reliability_bins(o.logits, o.labels))


def agreement(o: Outputs) -> float:
    """The share of test images on which student and teacher predict the same class."""
    return (o.logits.argmax(1) == o.teacher_logits.argmax(1)).double().mean().item()


def kl_teacher_student(o: Outputs) -> float:
    """KL(teacher || student) of the softmax outputs, averaged over images."""
    return F.kl_div(o.logits.double().log_softmax(1), o.teacher_logits.double().log_softmax(1), log_target=True,
                    reduction="batchmean").item()


def logit_cosine(o: Outputs) -> float:
    return F.cosine_similarity(o.logits.double(), o.teacher_logits.double(), dim=1).mean().item()


def entropy(o: Outputs) -> float:
    """Mean predictive entropy of the softmax outputs."""
    log_p = o.logits.double().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1).mean().item()


def embedding_cka(o: Outputs) -> float:
    """Linear CKA of the student's and the teacher's embeddings; NaN when either is unknown."""
    return math.nan if o.embed is None or o.teacher_embed is None else linear_cka(o.embed, o.teacher_embed)


@dataclass(frozen=True)
class Metric:
    """One per-model column of the report.

    compute: the value from the test-set outputs; None for a number the run recorded under the same name in
    results.json. higher_is_better: None where neither direction is better. ranked: one of the metrics that rank
    the methods (it needs a direction). format: Python's format spec for tables.
    """
    name: str
    compute: Callable[[Outputs], float] | None
    higher_is_better: bool | None
    ranked: bool = False
    format: str = ".4f"

    def __post_init__(self):
        if self.ranked and self.higher_is_better is None:
            raise ValueError(f"metric {self.name!r} is ranked but has no direction: give it higher_is_better=True "
                             "(e.g. accuracy) or False (e.g. a loss), or ranked=False")


METRICS = (
    Metric("test_acc", accuracy, higher_is_better=True, ranked=True),
    Metric("test_loss", cross_entropy, higher_is_better=False, ranked=True),
    Metric("ece", calibration_error, higher_is_better=False, ranked=True),
    Metric("agreement", agreement, higher_is_better=True, ranked=True),
    Metric("kl", kl_teacher_student, higher_is_better=False, ranked=True),
    Metric("cosine", logit_cosine, higher_is_better=True, ranked=True),
    # Low entropy is confident, not better: an overconfident student has the lowest.
    Metric("entropy", entropy, higher_is_better=None),
    # How teacher-like the features are: a description of the method, not a quality.
    Metric("cka", embedding_cka, higher_is_better=None),
    # As the run recorded them: the selection set, the training set, the last epoch, the cost.
    Metric("test_acc_last", None, higher_is_better=True),
    Metric("val_acc", None, higher_is_better=True),
    Metric("train_acc", None, higher_is_better=True),
    Metric("train_time_sec", None, higher_is_better=False, format=".1f"),
)
PRIMARY = "test_acc"  # the metric tables are sorted by


def metric_names() -> list[str]:
    return [m.name for m in METRICS]


def ranked_metrics() -> list[Metric]:
    return [m for m in METRICS if m.ranked]


def metric_formats() -> dict[str, str]:
    return {m.name: m.format for m in METRICS}


def primary_metric() -> Metric:
    return next(m for m in METRICS if m.name == PRIMARY)


def computed_metrics(outputs: Outputs) -> dict[str, float]:
    """Every metric computed from test-set outputs."""
    return {m.name: m.compute(outputs) for m in METRICS if m.compute is not None}


def recorded_metrics(results: dict) -> dict:
    """Every metric the run recorded in its results.json (None where it has none)."""
    return {m.name: results.get(m.name) for m in METRICS if m.compute is None}
