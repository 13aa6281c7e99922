import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss


class FitNet(DistillationLoss):
    """FitNet-style feature distillation (Romero et al. 2015, with a 1x1 regressor and normalised features).

    The student's feature map goes through a trainable 1x1 conv + BN + ReLU to the teacher's channel count and
    is average-pooled to the teacher's spatial size; both maps are L2-normalised over channels at each
    position; hint = MSE. loss = CE(z_s, y) + w(epoch) * hint, with w ramped linearly from weight/R to weight
    over the first R = ramp_fraction * epochs epochs, then constant.
    """

    def __init__(self, weight: float, ramp_fraction: float, feature_shapes, feature: str = "feat"):
        super().__init__()
        self.weight, self.ramp_fraction, self.feature = weight, ramp_fraction, feature
        student_channels = feature_shapes["student"][feature][0]
        teacher_channels, *self.teacher_size = feature_shapes["teacher"][feature]
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )

    def current_weight(self) -> float:
        ramp_epochs = max(1, round(self.ramp_fraction * self.num_epochs))
        return self.weight * min(1.0, (self.epoch + 1) / ramp_epochs)

    def forward(self, student, teacher, labels):
        projected = F.adaptive_avg_pool2d(self.projector(student.features[self.feature]), self.teacher_size)
        hint = F.mse_loss(F.normalize(projected, dim=1), F.normalize(teacher.features[self.feature], dim=1))
        ce = F.cross_entropy(student.logits, labels)
        return ce + self.current_weight() * hint, {"ce": ce, "hint": hint}
