import torch.nn.functional as F

from kd.losses.base import DistillationLoss


def attention_map(features, size):
    """Mean over channels of F^2, average-pooled to `size`, flattened and L2-normalised per sample."""
    attention = F.adaptive_avg_pool2d(features.pow(2).mean(1, keepdim=True), size)
    return F.normalize(attention.flatten(1), dim=1)


class AttentionTransfer(DistillationLoss):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    A(F) = normalize(mean_c F_c^2); loss = CE(z_s, y) + weight * MSE(A(F_s), A(F_t)).
    Maps of different spatial size are compared at the smaller size (the larger one is average-pooled).
    """

    def __init__(self, weight: float, feature: str = "feat", feature_shapes=None):
        super().__init__()
        self.weight, self.feature = weight, feature

    def forward(self, student, teacher, labels):
        fs, ft = student.features[self.feature], teacher.features[self.feature]
        size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
        at = F.mse_loss(attention_map(fs, size), attention_map(ft, size))
        ce = F.cross_entropy(student.logits, labels)
        return ce + self.weight * at, {"ce": ce, "at": at}
