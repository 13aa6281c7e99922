import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts
from kd.losses.entropy_aware import ARGUMENT_RANGES as ENTROPY_RANGES, entropy_weights
from kd.losses.logit_standardization import zscore
from kd.losses.schedule import ramp


def target_split(logits: torch.Tensor, gt: torch.Tensor, temperature: float) -> torch.Tensor:
    """The log of the two bins b = [p_gt, 1 - p_gt] (B x 2) of p = softmax(z / T), in log space.

    `gt` is the one-hot mask of the labels. log(1 - p_gt) is the logsumexp of the other classes'
    log-probabilities: finite however confident the network is. mdistiller takes torch.log of the summed
    other-class probabilities, which is finite while p_gt rounds to 1 (float32, T = 4: a true-class logit of +200
    over others near 0 gives the same value as here) and -inf only once every other probability underflows to 0:
    the loss is inf at +600; its gradient already overflows from about +360 (float64: about +3000).
    """
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_gt = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1, keepdim=True)  # = log p_gt
    log_other = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_gt, log_other], dim=1)


def decoupled_kl(student_logits, teacher_logits, target, temperature: float, weights=None):
    """(TCKD, NCKD), each T^2 * a mean over the batch (weighted by `weights` per sample, when given).

    TCKD = KL(b_t || b_s) over the two bins [gt, rest]; NCKD = KL(p^_t || p^_s) over the non-target classes,
    p^ = softmax of z/T with the gt class left out (its logit set to -inf, where mdistiller subtracts 1000).
    The student's -inf at gt is replaced by 0 after the softmax: it meets a teacher weight of exactly 0, so it
    adds nothing and passes no gradient (0 * log(-inf) would be NaN).
    """
    gt = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, target[:, None], True)
    n = len(target)
    log_b_s = target_split(student_logits, gt, temperature)
    log_b_t = target_split(teacher_logits, gt, temperature)
    log_hat_s = F.log_softmax((student_logits / temperature).masked_fill(gt, float("-inf")), dim=1)
    hat_t = F.softmax((teacher_logits / temperature).masked_fill(gt, float("-inf")), dim=1)
    if weights is None:
        tckd = F.kl_div(log_b_s, log_b_t, log_target=True, reduction="sum") / n
        nckd = F.kl_div(log_hat_s.masked_fill(gt, 0.0), hat_t, reduction="sum") / n  # xlogy: 0 * log 0 = 0
    else:
        tckd = (F.kl_div(log_b_s, log_b_t, log_target=True, reduction="none").sum(1) * weights).mean()
        nckd = (F.kl_div(log_hat_s.masked_fill(gt, 0.0), hat_t, reduction="none").sum(1) * weights).mean()
    return temperature**2 * tckd, temperature**2 * nckd


class DKD(DistillationLoss):
    """Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).

    p = softmax(z / T); b = [p_gt, 1 - p_gt]; p^ = softmax over the non-target classes (p_c / (1 - p_gt)).
    TCKD = T^2 * mean_i KL(b_t || b_s),  NCKD = T^2 * mean_i KL(p^_t || p^_s)
    loss = ce_weight * CE(z_s, y) + w(t) * (alpha * TCKD + beta * NCKD),
    w(t) = min(1, t / (warmup_fraction * epochs)) after t epochs (kd.losses.schedule.ramp); CE is not warmed up.
    standardize: z-score both logit vectors first (Sun et al., CVPR 2024, arXiv:2403.01427), T the base temperature.
    entropy_aware: EA-DKD (Su et al., ICCV 2025, arXiv:2311.13621): TCKD and NCKD become T^2 * mean_i w_i KL_i with
    w_i = H_t,i (1 + H_s,i / H_ub) / 2 (kd.losses.entropy_aware; entropies of softmax(z/T') of the raw logits,
    T' = `entropy_temperature`, H_ub = `entropy_bound` or log C), as the authors' DKD.py weights
    alpha * TCKD_i + beta * NCKD_i. Their DKD.py reads the z-scored logits for w when combined with LS and always
    uses T' = 3 (its get_w call passes no t).

    Deviations from mdistiller's code, same values wherever theirs are finite: the two bins' logs are taken in log
    space (`target_split`) instead of torch.log of the summed probabilities, which is -inf once all the other
    classes' probabilities underflow (not when p_gt merely rounds to 1: see `target_split`); and the gt class
    is left out of p^ by a -inf logit instead of subtracting 1000 from its logit / T, which no longer hides it
    when the gt logit leads the others by more than 1000 * T.
    """

    argument_ranges = {"ce_weight": "[0, inf)", "alpha": "[0, inf)", "beta": "[0, inf)", "temperature": "(0, inf)",
                       "warmup_fraction": "[0, 1]", **ENTROPY_RANGES}

    def __init__(self, ce_weight: float, alpha: float, beta: float, temperature: float, warmup_fraction: float,
                 standardize: bool, entropy_aware: bool = False, entropy_temperature: float | None = None,
                 entropy_bound: float | None = None):
        super().__init__()
        self.ce_weight, self.alpha, self.beta, self.temperature = ce_weight, alpha, beta, temperature
        self.warmup_fraction, self.standardize = warmup_fraction, standardize
        self.weighting = entropy_weights("DKD", entropy_aware, entropy_temperature, entropy_bound)

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        z_s, z_t = student.logits, teacher.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        weights = None if self.weighting is None else self.weighting(student.logits, teacher.logits)
        tckd, nckd = decoupled_kl(z_s, z_t, batch.labels, self.temperature, weights)
        warmup = ramp(batch.progress, fraction=self.warmup_fraction)
        distillation = warmup * (self.alpha * tckd + self.beta * nckd)
        weighting = {} if weights is None else {"entropy_weight": weights.mean()}
        return LossParts(self.ce_weight * ce, distillation, {"ce": ce, "tckd": tckd, "nckd": nckd, **weighting})
