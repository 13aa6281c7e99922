import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, off_diagonal, pooled


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix; the clamp keeps the gradient finite where two points coincide."""
    squared = x.pow(2).sum(1)
    d2 = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=1e-12)
    return d2.sqrt()


def distance_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between distance matrices, each divided by the mean of its positive off-diagonal entries
    (every off-diagonal distance is positive: the clamp keeps it at least 1e-6)."""
    if len(s) < 2:
        return s.sum() * 0.0

    def normalised(x):
        d = off_diagonal(pairwise_distances(x))
        return d / d.mean()
    return F.smooth_l1_loss(normalised(s), normalised(t))


def triplet_cosines(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos of the angle at x_i in every triangle (x_j, x_i, x_k), as an n x n x n array [i, j, k], and the mask of
    the entries with i, j, k distinct (a mask, not a selection: its size would make the host wait)."""
    n = len(x)
    edges = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # edges[i, j] = unit(x_j - x_i)
    cosines = edges @ edges.transpose(1, 2)  # [i, j, k]
    idx = torch.arange(n, device=x.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :]) \
        & (idx[None, :, None] != idx[None, None, :])
    return cosines, distinct


def angle_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the triplet cosines, averaged over the n(n-1)(n-2) triplets of distinct samples."""
    n = len(s)
    if n < 3:
        return s.sum() * 0.0
    (cos_s, distinct), (cos_t, _) = triplet_cosines(s), triplet_cosines(t)
    per_triplet = F.smooth_l1_loss(cos_s, cos_t, reduction="none")
    return torch.where(distinct, per_triplet, 0.0).sum() / (n * (n - 1) * (n - 2))


class RKD(DistillationLoss):
    """Park et al. 2019, "Relational Knowledge Distillation", on L2-normalised, globally pooled features.

    loss = CE(z_s, y) + distance_weight * RKD_D + angle_weight * RKD_A, where RKD_D is the smooth L1 between
    pairwise distances (each set divided by its positive mean) and RKD_A the smooth L1 between the cosines
    of all triplet angles. RepDistiller and mdistiller take the pooled features as they are, without the L2
    normalisation, which changes distances and angles alike (conf/method/rkd.yaml gives how much).
    """

    argument_ranges = {"distance_weight": "[0, inf)", "angle_weight": "[0, inf)"}

    def __init__(self, distance_weight: float, angle_weight: float, feature: str):
        super().__init__()
        self.distance_weight, self.angle_weight, self.feature = distance_weight, angle_weight, feature

    def forward(self, student, teacher, batch):
        s = F.normalize(pooled(student.features[self.feature]), dim=1)
        t = F.normalize(pooled(teacher.features[self.feature]), dim=1)
        distance, angle = distance_term(s, t), angle_term(s, t)
        ce = F.cross_entropy(student.logits, batch.labels)
        distillation = self.distance_weight * distance + self.angle_weight * angle
        return LossParts(ce, distillation, {"ce": ce, "distance": distance, "angle": angle})
