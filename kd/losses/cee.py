import torch.nn.functional as F

from kd.losses.base import DistillationLoss


class HardLabelKD(DistillationLoss):
    """Hard-label distillation: the teacher's argmax as a second set of labels.

    loss = beta * CE(z_s, argmax z_t) + (1 - beta) * CE(z_s, y)
    """

    def __init__(self, beta: float, feature_shapes=None):
        super().__init__()
        self.beta = beta

    def forward(self, student, teacher, labels):
        ce = F.cross_entropy(student.logits, labels)
        ce_teacher = F.cross_entropy(student.logits, teacher.logits.argmax(1))
        return self.beta * ce_teacher + (1 - self.beta) * ce, {"ce": ce, "ce_teacher": ce_teacher}
