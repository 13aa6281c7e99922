import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled


def projection_head(in_features: int, width: int, out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Linear(width, out_features))


class InBatchCRD(DistillationLoss):
    """Contrastive representation distillation, in-batch InfoNCE form (after Tian et al. 2020).

    Two-layer MLP heads map the pooled student and teacher features to L2-normalised embeddings e_s, e_t;
    CRD = CE(e_s e_t^T / tau, diagonal): each student embedding must pick its own image's teacher embedding
    among the batch. Tian et al. draw negatives from a memory bank; this uses the other images of the batch.
    loss = CE(z_s, y) + weight * CRD. Both heads are trained with the student.
    """

    argument_ranges = {"tau": "(0, inf)", "weight": "[0, inf)", "head_width": "[1, inf)", "embed_dim": "[1, inf)"}

    def __init__(self, tau: float, weight: float, head_width: int, embed_dim: int, feature: str, feature_shapes):
        super().__init__()
        self.tau, self.weight, self.feature = tau, weight, feature
        self.student_head = projection_head(feature_shapes["student"][feature][0], head_width, embed_dim)
        self.teacher_head = projection_head(feature_shapes["teacher"][feature][0], head_width, embed_dim)

    def forward(self, student, teacher, batch):
        e_s = F.normalize(self.student_head(pooled(student.features[self.feature])), dim=1)
        e_t = F.normalize(self.teacher_head(pooled(teacher.features[self.feature])), dim=1)
        similarity = e_s @ e_t.t() / self.tau
        crd = F.cross_entropy(similarity, torch.arange(len(similarity), device=similarity.device))
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * crd, {"ce": ce, "crd": crd})
