import torch.nn.functional as F

from kd.losses.base import DistillationLoss


class CrossEntropy(DistillationLoss):
    """Baseline: plain cross-entropy on the labels, no teacher term."""

    needs_teacher = False

    def forward(self, student, teacher, labels):
        ce = F.cross_entropy(student.logits, labels)
        return ce, {"ce": ce}
