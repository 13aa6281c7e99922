
import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, soft_kl
from kd.losses.batch import Progress
from kd.losses.entropy_aware import ARGUMENT_RANGES as ENTROPY_RANGES, entropy_weights, reweighted_kl
from kd.losses.logit_standardization import zscore
from kd.losses.schedule import cosine_ramp


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by -strength (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


class CTKD(DistillationLoss):
    """Curriculum temperature KD, global temperature (Li, Li, Yang, Zhao, Song, Luo, Li & Yang, "Curriculum
    Temperature for Knowledge Distillation", AAAI 2023, arXiv:2211.16231).

    One learnable temperature tau = t_start + t_range * sigmoid(theta), trained against the student: theta
    reaches tau through a gradient-reversal layer, so the student descends the loss while theta ascends it
    with the reversed gradient scaled by lambda(t) = lambda_max * (1 - cos(pi * min(1, t / R))) / 2, R =
    curriculum_fraction * epochs, t = epochs done counted per step (the authors' lambda is constant within
    epoch e and equals this value at its end).
    loss = ce_weight * CE(z_s, y) + kd_weight * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau)); the
    gradient reaches theta through tau^2 and both softmaxes.

    standardize: both logit vectors z-scored first, Z(z) = (z - mean) / (std + 1e-7) (Sun et al., CVPR 2024,
    arXiv:2403.01427; their CTKD/distiller_zoo/KD.py DistillKL_logit_stand), tau still learned; the CE reads the
    raw logits.
    entropy_aware: EA-CTKD (Su et al., ICCV 2025, arXiv:2311.13621): tau^2 * mean_i w_i KL_i with
    w_i = H_t,i (1 + H_s,i / H_ub) / 2 (kd.losses.entropy_aware; entropies of softmax(z/T') of the raw logits at
    the fixed T' = `entropy_temperature`, so w does not depend on tau). The authors have not released EA-CTKD's
    code (their README: "will be made publicly available in the final version"): this is the weighting of their
    KD.py applied to CTKD's term.
    """

    argument_ranges = {"t_start": "(0, inf)", "t_range": "[0, inf)", "lambda_max": "[0, inf)",
                       "curriculum_fraction": "[0, 1]", "ce_weight": "[0, inf)", "kd_weight": "[0, inf)",
                       **ENTROPY_RANGES}

    def __init__(self, t_start: float, t_range: float, theta_init: float, lambda_max: float,
                 curriculum_fraction: float, ce_weight: float, kd_weight: float, standardize: bool,
                 entropy_aware: bool = False, entropy_temperature: float | None = None,
                 entropy_bound: float | None = None):
        super().__init__()
        self.t_start, self.t_range = t_start, t_range
        self.lambda_max, self.curriculum_fraction = lambda_max, curriculum_fraction
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.standardize = standardize
        self.weighting = entropy_weights("CTKD", entropy_aware, entropy_temperature, entropy_bound)
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))

    def reversal_strength(self, progress: Progress | None) -> float:
        return self.lambda_max * cosine_ramp(progress, self.curriculum_fraction)

    def forward(self, student, teacher, batch):
        theta = _ReverseGradient.apply(self.theta, self.reversal_strength(batch.progress))
        tau = self.t_start + self.t_range * torch.sigmoid(theta)
        z_s, z_t = student.logits, teacher.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        if self.weighting is None:
            kd, weighting = tau**2 * soft_kl(z_s, z_t, tau), {}
        else:
            weights = self.weighting(student.logits, teacher.logits)
            kd, weighting = reweighted_kl(z_s, z_t, tau, weights), {"entropy_weight": weights.mean()}
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(self.ce_weight * ce, self.kd_weight * kd,
                         {"ce": ce, "kd": kd, "temperature": tau.detach(), **weighting})
