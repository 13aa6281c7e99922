import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """The b x b Gram matrix of the flattened feature maps, each row L2-normalised."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


class SimilarityPreserving(DistillationLoss):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).

    G = row_normalize(Q Q^T) with Q the b x (C*H*W) flattened feature maps of a batch, one G per network;
    SP = ||G_t - G_s||_F^2 / b^2; loss = CE(z_s, y) + weight * SP.
    Only the batch must match between the two maps. Each row of G has unit norm, so SP shrinks like 1/b:
    the weight is tuned for one batch size (the authors': 64).
    """

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float, feature: str):
        super().__init__()
        self.weight, self.feature = weight, feature

    def forward(self, student, teacher, batch):
        g_s = similarity_matrix(student.features[self.feature])
        g_t = similarity_matrix(teacher.features[self.feature])
        sp = (g_t - g_s).pow(2).sum() / len(g_s) ** 2
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * sp, {"ce": ce, "sp": sp})
