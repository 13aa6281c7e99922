import math

import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, pooled_to

RESIZE = ("features", "maps")


def attention_map(features, size=None):
    """Mean over channels of F^2 (average-pooled to `size` if given), flattened and L2-normalised per sample."""
    attention = features.pow(2).mean(1, keepdim=True)
    attention = attention if size is None else pooled_to(attention, size)
    return F.normalize(attention.flatten(1), dim=1)


class AttentionTransfer(DistillationLoss):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    A(F) = normalize(mean_c F_c^2); loss = CE(z_s, y) + weight * MSE(A(F_s), A(F_t)).
    Maps of different spatial size are compared at the smaller size. resize "features": the larger feature map is
    average-pooled before squaring, A(pool(F)) (RepDistiller's and mdistiller's at_loss); "maps": its attention
    map is pooled after, pool(A(F)), the mean of the squares rather than the square of the means, so a pooled
    map also keeps the activations' variance within each pooling window.
    Both maps have unit norm, so the MSE is their squared distance divided by the number of positions
    compared: the same weight acts 4x more strongly at 4x4 than at 8x8.
    """

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float, feature: str, resize: str, feature_shapes):
        super().__init__()
        if resize not in RESIZE:
            raise ValueError(f"at: resize {resize!r} is not one of {list(RESIZE)}")
        self.weight, self.feature, self.resize = weight, feature, resize
        student, teacher = feature_shapes["student"][feature], feature_shapes["teacher"][feature]
        self.size = tuple(min(a, b) for a, b in zip(student[-2:], teacher[-2:]))

    def scale_note(self) -> str:
        positions = math.prod(self.size)
        return (f"at: maps compared at {self.size[0]}x{self.size[1]} = {positions} positions; weight {self.weight:g} "
                f"acts as {self.weight / positions:.4g} per unit of squared distance between the unit-norm maps")

    def attention(self, features):
        if self.resize == "features":
            return attention_map(pooled_to(features, self.size))
        return attention_map(features, self.size)

    def forward(self, student, teacher, batch):
        fs, ft = student.features[self.feature], teacher.features[self.feature]
        at = F.mse_loss(self.attention(fs), self.attention(ft))
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * at, {"ce": ce, "at": at})
