import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


class HardLabelKD(DistillationLoss):
    """Hard-label distillation: the teacher's argmax as a second set of labels.

    loss = beta * CE(z_s, argmax z_t) + (1 - beta) * CE(z_s, y)
    """

    argument_ranges = {"beta": "[0, 1]"}

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        ce_teacher = F.cross_entropy(student.logits, teacher.logits.argmax(1))
        return LossParts((1 - self.beta) * ce, self.beta * ce_teacher, {"ce": ce, "ce_teacher": ce_teacher})
