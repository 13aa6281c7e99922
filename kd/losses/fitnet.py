import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts
from kd.losses.schedule import ramp


class FitNet(DistillationLoss):
    """FitNet-style feature distillation (Romero et al. 2015, with a 1x1 regressor and normalised features).

    The student's feature map goes through a trainable 1x1 conv + BN + ReLU to the teacher's channel count and
    is average-pooled to the teacher's spatial size; both maps are L2-normalised over channels at each
    position; hint = MSE, a mean over the teacher's C x H x W values. loss = CE(z_s, y) + w * hint, with
    w = weight * min(1, t / (ramp_fraction * epochs)) after t epochs of training (counted per step).
    Per position the squared distance of two unit vectors is at most 4 and the mean divides it by C, so the
    same weight acts 8x more strongly with a 64-channel teacher than with a 512-channel one.
    """

    argument_ranges = {"weight": "[0, inf)", "ramp_fraction": "[0, 1]"}

    def __init__(self, weight: float, ramp_fraction: float, feature: str, feature_shapes):
        super().__init__()
        self.weight, self.ramp_fraction, self.feature = weight, ramp_fraction, feature
        student_channels = feature_shapes["student"][feature][0]
        self.teacher_channels, *self.teacher_size = feature_shapes["teacher"][feature]
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, self.teacher_channels, 1, bias=False),
            nn.BatchNorm2d(self.teacher_channels),
            nn.ReLU(inplace=True),
        )

    def scale_note(self) -> str:
        return (f"fitnet: hint averaged over the teacher's {self.teacher_channels} channels at each position; weight "
                f"{self.weight:g} acts as {self.weight / self.teacher_channels:.4g} per unit of squared distance "
                f"between the unit-norm channel vectors")

    def forward(self, student, teacher, batch):
        projected = F.adaptive_avg_pool2d(self.projector(student.features[self.feature]), self.teacher_size)
        hint = F.mse_loss(F.normalize(projected, dim=1), F.normalize(teacher.features[self.feature], dim=1))
        ce = F.cross_entropy(student.logits, batch.labels)
        weight = self.weight * ramp(batch.progress, fraction=self.ramp_fraction)
        return LossParts(ce, weight * hint, {"ce": ce, "hint": hint})
