import torch.nn.functional as F

from kd.losses.base import DistillationLoss


class LogitMatching(DistillationLoss):
    """Logit matching (Ba & Caruana 2014 style): loss = CE(z_s, y) + weight * MSE(z_s, z_t)."""

    def __init__(self, weight: float, feature_shapes=None):
        super().__init__()
        self.weight = weight

    def forward(self, student, teacher, labels):
        ce = F.cross_entropy(student.logits, labels)
        mse = F.mse_loss(student.logits, teacher.logits)
        return ce + self.weight * mse, {"ce": ce, "mse": mse}
