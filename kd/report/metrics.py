"""Per-model numbers from test-set logits and embeddings: quality, calibration, per-class accuracy, and closeness
to the teacher (predictions, logits, and linear CKA of the embeddings).

Calibration has one binning, used by the ECE and the reliability diagram alike: `ECE_BINS` equal-width bins of
the top-class confidence, bin i = (i/B, (i+1)/B], so a confidence of exactly 1.0 is in the top bin and one exactly
on an edge in the bin below it. (torchmetrics' calibration error bins [lo, hi) and puts 1.0 into an extra bin.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix

ECE_BINS = 10  # equal-width confidence bins, as the original notebook used

# Rank direction of each metric: True where higher is better.
HIGHER_IS_BETTER = {"test_acc": True, "test_loss": False, "ece": False, "agreement": True, "kl": False,
                    "cosine": True, "entropy": False}


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


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean CE, ECE, and agreement / KL(teacher || student) / logit cosine against the teacher."""
    logits, teacher_logits = logits.double(), teacher_logits.double()
    log_p, log_q = logits.log_softmax(1), teacher_logits.log_softmax(1)
    return {
        "test_acc": (logits.argmax(1) == labels).double().mean().item(),
        "test_loss": F.cross_entropy(logits, labels).item(),
        "ece": expected_calibration_error(reliability_bins(logits, labels)),
        "agreement": (logits.argmax(1) == teacher_logits.argmax(1)).double().mean().item(),
        "kl": F.kl_div(log_p, log_q, log_target=True, reduction="batchmean").item(),
        "cosine": F.cosine_similarity(logits, teacher_logits, dim=1).mean().item(),
        "entropy": -(log_p.exp() * log_p).sum(1).mean().item(),
    }
