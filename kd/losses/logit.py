import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


class LogitMatching(DistillationLoss):
    """Logit matching (Ba & Caruana 2014 style): loss = CE(z_s, y) + weight * MSE(z_s, z_t)."""

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        mse = F.mse_loss(student.logits, teacher.logits)
        return LossParts(ce, self.weight * mse, {"ce": ce, "mse": mse})
