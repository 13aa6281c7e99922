import math

import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


def attention_map(features, size):
    """Mean over channels of F^2, average-pooled to `size`, flattened and L2-normalised per sample."""
    attention = F.adaptive_avg_pool2d(features.pow(2).mean(1, keepdim=True), size)
    return F.normalize(attention.flatten(1), dim=1)


class AttentionTransfer(DistillationLoss):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    A(F) = normalize(mean_c F_c^2); loss = CE(z_s, y) + weight * MSE(A(F_s), A(F_t)).
    Maps of different spatial size are compared at the smaller size (the larger one is average-pooled).
    Both maps have unit norm, so the MSE is their squared distance divided by the number of positions
    compared: the same weight acts 4x more strongly at 4x4 than at 8x8.
    """

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float, feature: str, feature_shapes):
        super().__init__()
        self.weight, self.feature = weight, feature
        student, teacher = feature_shapes["student"][feature], feature_shapes["teacher"][feature]
        self.size = tuple(min(a, b) for a, b in zip(student[-2:], teacher[-2:]))

    def scale_note(self) -> str:
        positions = math.prod(self.size)
        return (f"at: maps compared at {self.size[0]}x{self.size[1]} = {positions} positions; weight {self.weight:g} "
                f"acts as {self.weight / positions:.4g} per unit of squared distance between the unit-norm maps")

    def forward(self, student, teacher, batch):
        fs, ft = student.features[self.feature], teacher.features[self.feature]
        at = F.mse_loss(attention_map(fs, self.size), attention_map(ft, self.size))
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * at, {"ce": ce, "at": at})
