import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, soft_kl
from kd.losses.logit_standardization import zscore


class VanillaKD(DistillationLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)

    standardize: both logit vectors go through the z-score Z(z) = (z - mean) / (std + 1e-7) of Sun et al.,
    "Logit Standardization in Knowledge Distillation", CVPR 2024 (arXiv:2403.01427) before the softmax (the CE
    reads the raw logits): T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)), T the base temperature.
    It defaults to False only so that `VanillaKD(T, alpha)` keeps meaning what it meant; every YAML sets it.
    """

    def __init__(self, temperature: float, alpha: float, standardize: bool = False):
        super().__init__()
        self.temperature, self.alpha, self.standardize = temperature, alpha, standardize

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        z_s, z_t = student.logits, teacher.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        kd = self.temperature**2 * soft_kl(z_s, z_t, self.temperature)
        return LossParts((1 - self.alpha) * ce, self.alpha * kd, {"ce": ce, "kd": kd})
