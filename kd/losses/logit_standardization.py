"""Logit standardisation (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
arXiv:2403.01427): the one z-score that every logit loss with a `standardize` switch applies to both networks'
logits before its temperature softmax."""
import torch

EPS = 1e-7
"""Added to the standard deviation, as the authors' `normalize` (mdistiller/distillers/KD.py of
sunshangquan/logit-standardization-KD): a constant row maps to zeros instead of 0/0."""


def zscore(logits: torch.Tensor) -> torch.Tensor:
    """Z(z) = (z - mean_c z) / (std_c z + 1e-7), per sample over the classes.

    std is Bessel-corrected (divides by C - 1), as `torch.std` in the authors' code; the paper's sigma may be the
    population std, a factor sqrt(C / (C - 1)) on the effective temperature (1.05 for 10 classes, 1.005 for 100).
    """
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + EPS)
