"""Per-model numbers from test-set logits: quality, calibration, and closeness to the teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 10  # equal-width confidence bins, as the original notebook used

# Rank direction of each metric: True where higher is better.
HIGHER_IS_BETTER = {"test_acc": True, "test_loss": False, "ece": False, "agreement": True, "kl": False,
                    "cosine": True, "entropy": False}


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean CE, ECE, and agreement / KL(teacher || student) / logit cosine against the teacher."""
    logits, teacher_logits = logits.double(), teacher_logits.double()
    log_p, log_q = logits.log_softmax(1), teacher_logits.log_softmax(1)
    return {
        "test_acc": (logits.argmax(1) == labels).double().mean().item(),
        "test_loss": F.cross_entropy(logits, labels).item(),
        "ece": multiclass_calibration_error(log_p.exp(), labels, logits.shape[1], n_bins=ECE_BINS, norm="l1").item(),
        "agreement": (logits.argmax(1) == teacher_logits.argmax(1)).double().mean().item(),
        "kl": F.kl_div(log_p, log_q, log_target=True, reduction="batchmean").item(),
        "cosine": F.cosine_similarity(logits, teacher_logits, dim=1).mean().item(),
        "entropy": -(log_p.exp() * log_p).sum(1).mean().item(),
    }


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin (lo, hi]: sample count, summed confidence, number correct. Sums, so seeds pool by adding."""
    confidence, predicted = logits.double().softmax(1).max(1)
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    correct = (predicted == labels).double()
    return {"count": torch.bincount(bins, minlength=n_bins).tolist(),
            "confidence": torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence).tolist(),
            "correct": torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct).tolist()}
