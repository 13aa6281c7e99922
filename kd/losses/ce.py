import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


class CrossEntropy(DistillationLoss):
    """Baseline: plain cross-entropy on the labels, no teacher term."""

    needs_teacher = False

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, ce.new_zeros(()), {"ce": ce})
