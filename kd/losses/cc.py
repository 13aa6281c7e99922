import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled


def taylor_rbf_correlation(x: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """b x b correlation of unit vectors under the Gaussian RBF exp(-gamma ||x_i - x_j||^2), approximated by
    its Taylor expansion exp(-2 gamma) sum_{p=0..order} (2 gamma)^p / p! (x_i . x_j)^p (exact for order -> inf)."""
    dot = x @ x.t()
    series = sum((2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1))
    return math.exp(-2 * gamma) * series


class CorrelationCongruence(DistillationLoss):
    """Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (arXiv:1904.01802).

    e_s = normalize(W pool(F_s) + b) (a trainable linear embedding head), e_t = normalize(pool(F_t));
    C_ij = k(e_i, e_j) for each network, k the Gaussian RBF in its order-`order` Taylor expansion;
    CC = ||C_s - C_t||_F^2 / b^2; loss = CE(z_s, y) + weight * CC.
    The teacher's side has no trainable head: with heads on both sides, two heads that map every image to the
    same vector make both matrices the same constant and the loss 0 whatever the networks do (normalised or
    not). The kernel compares the images of one network with each other, so the two widths need not match.
    """

    argument_ranges = {"weight": "[0, inf)", "gamma": "(0, inf)", "order": "[1, inf)", "embed_dim": "[1, inf)"}

    def __init__(self, weight: float, gamma: float, order: int, embed_dim: int, feature: str, feature_shapes):
        super().__init__()
        self.weight, self.gamma, self.order, self.feature = weight, gamma, order, feature
        self.student_head = nn.Linear(feature_shapes["student"][feature][0], embed_dim)

    def forward(self, student, teacher, batch):
        e_s = F.normalize(self.student_head(pooled(student.features[self.feature])), dim=1)
        e_t = F.normalize(pooled(teacher.features[self.feature]), dim=1)
        c_s = taylor_rbf_correlation(e_s, self.gamma, self.order)
        c_t = taylor_rbf_correlation(e_t, self.gamma, self.order)
        cc = (c_s - c_t).pow(2).mean()
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * cc, {"ce": ce, "cc": cc})
