import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, soft_kl
from kd.losses.entropy_aware import ARGUMENT_RANGES as ENTROPY_RANGES, entropy_weights, reweighted_kl
from kd.losses.logit_standardization import zscore


class WeightedKD(DistillationLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", with a weight on each term, as
    mdistiller and the logit-standardisation code write it:

    loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))

    standardize: both logit vectors go through the z-score Z(z) = (z - mean) / (std + 1e-7) of Sun et al.,
    "Logit Standardization in Knowledge Distillation", CVPR 2024 (arXiv:2403.01427) before the softmax (the CE
    reads the raw logits): T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)), T the base temperature.

    entropy_aware: each sample's KL is weighted by the EA-KD weight w_i = H_t,i (1 + H_s,i / H_ub) / 2 of Su et al.,
    ICCV 2025 (arXiv:2311.13621; kd.losses.entropy_aware), entropies at `entropy_temperature` T', H_ub =
    `entropy_bound` (None: log C): T^2 * mean_i w_i KL_i. The weights read the raw logits, also when standardized
    (the authors' EA-MLD+LS; their DKD reads the z-scored ones). Off (the default): the loss above, unchanged.
    """

    argument_ranges = {"temperature": "(0, inf)", "ce_weight": "[0, inf)", "kd_weight": "[0, inf)",
                       **ENTROPY_RANGES}

    def __init__(self, temperature: float, ce_weight: float, kd_weight: float, standardize: bool,
                 entropy_aware: bool = False, entropy_temperature: float | None = None,
                 entropy_bound: float | None = None):
        super().__init__()
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.standardize = standardize
        self.weighting = entropy_weights(type(self).__name__, entropy_aware, entropy_temperature, entropy_bound)

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        z_s, z_t = student.logits, teacher.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        if self.weighting is None:
            kd, weighting = self.temperature**2 * soft_kl(z_s, z_t, self.temperature), {}
        else:
            weights = self.weighting(student.logits, teacher.logits)
            kd, weighting = reweighted_kl(z_s, z_t, self.temperature, weights), {"entropy_weight": weights.mean()}
        return LossParts(self.ce_weight * ce, self.kd_weight * kd, {"ce": ce, "kd": kd, **weighting})


class VanillaKD(WeightedKD):
    """Hinton et al. 2015 in the original notebook's form: the two terms mixed by alpha.

    loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)   (`standardize` and
    `entropy_aware` as in WeightedKD)
    """

    argument_ranges = {**WeightedKD.argument_ranges, "alpha": "[0, 1]"}

    def __init__(self, temperature: float, alpha: float, standardize: bool, entropy_aware: bool = False,
                 entropy_temperature: float | None = None, entropy_bound: float | None = None):
        super().__init__(temperature, 1 - alpha, alpha, standardize, entropy_aware, entropy_temperature,
                         entropy_bound)

