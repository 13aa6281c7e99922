"""Entropy-aware per-sample weights (Su, Tseng, Pu, Zhao, Yang, Chen & Lee, "EA-KD: Entropy-based Adaptive
Knowledge Distillation", ICCV 2025, pp. 731-740, arXiv:2311.13621; code: cpsu00/EA-KD): the one reweighting that
every logit loss with an `entropy_aware` switch applies to its per-sample distillation terms.

    H(z) = -sum_c p_c log p_c,  p = softmax(z / T'),   T' the entropy temperature (not the loss's T)
    w_i = (H_t,i + H_t,i * H_s,i / H_ub) / 2 = H_t,i * (1 + H_s,i / H_ub) / 2
    L = mean_i w_i * L_i   (L_i the method's own per-sample distillation term; w carries no gradient)

Samples the teacher is unsure of weigh more (a plain KL weighs the confident ones more), and among those the ones
the student is still unsure of. The weights are not normalised: their mean (about H_t / 2, logged as
`entropy_weight`) also scales the distillation term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ARGUMENT_RANGES = {"entropy_temperature": "(0, inf)", "entropy_bound": "(0, inf)"}
"""The switch's numeric arguments, merged into each loss's `argument_ranges`."""


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(softmax(z / T')) per sample (B,), in nats, from the log-probabilities: exact where a probability
    underflows (the authors' log(p + 1e-10) or log(clamp(p, 1e-10)) differ by at most about C * 1e-10)."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


class EntropyWeights:
    """w = H_t (1 + H_s / H_ub) / 2 per sample, detached; `bound` H_ub, or None for log C (the entropy's maximum,
    the paper's H_ub), C read from the logits."""

    def __init__(self, temperature: float, bound: float | None):
        self.temperature, self.bound = temperature, bound

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        bound = math.log(student_logits.shape[1]) if self.bound is None else self.bound
        with torch.no_grad():
            h_t = entropy(teacher_logits, self.temperature)
            h_s = entropy(student_logits, self.temperature)
            return h_t * (1 + h_s / bound) / 2


def entropy_weights(owner: str, entropy_aware: bool, temperature: float | None,
                    bound: float | None) -> EntropyWeights | None:
    """The weighting a loss's `entropy_aware`, `entropy_temperature` and `entropy_bound` arguments ask for: None
    when the switch is off (the loss is then exactly the method's own)."""
    if not entropy_aware:
        return None
    if temperature is None:
        raise ValueError(f"{owner}: entropy_aware needs method.loss.entropy_temperature, the temperature T' of the "
                         f"entropies (the EA-KD authors: 3 on CIFAR-100, 2 on ImageNet)")
    return EntropyWeights(temperature, bound)


def reweighted_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature,
                  weights: torch.Tensor) -> torch.Tensor:
    """T^2 * mean_i w_i KL(softmax(z_t,i/T) || softmax(z_s,i/T)): the KD term with per-sample weights (T may be a
    0-dim tensor, CTKD's learned temperature)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(dim=1)
    return temperature**2 * (kl * weights).mean()
