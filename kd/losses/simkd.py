import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, pooled_to
from kd.models.reused_classifier import ReusedTeacherClassifier

FEATURE = "feat"  # in the wrapped student, the projector's output (ReusedTeacherClassifier.taps)


class SimKD(DistillationLoss):
    """Chen, Mei, Zhang, Wang, Feng & Chen, "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022
    (arXiv:2203.14001), as the authors' code computes it (DefangChen/SimKD models/util.py SimKD, helper/loops.py).

    The student is deployed with the teacher's classifier (kd.models.reused_classifier.ReusedTeacherClassifier, set
    as `model.student.wrapper` by conf/method/simkd.yaml): its last feature map, average-pooled to the teacher's size
    where it is larger, goes through a trainable projector P to the teacher's width, and the teacher's frozen
    classifier reads its pooled vector: z_s = W_t avgpool(P(F_s)) + b_t. The wrapped student's `feat` is P(F_s). With
    F_t the teacher's last feature map (`feat`), average-pooled to the student's size where it is larger:
        feature = MSE(P(F_s), F_t), a mean over the B x C_t x H x W values
        loss = ce_weight * CE(z_s, y) + weight * feature
    """

    argument_ranges = {"weight": "[0, inf)", "ce_weight": "[0, inf)"}
    student_wrapper = ReusedTeacherClassifier  # checked against model.student.wrapper before any work (kd/setup.py)

    def __init__(self, weight: float, ce_weight: float, student_model: ReusedTeacherClassifier, teacher_model):
        super().__init__()
        self.weight, self.ce_weight = weight, ce_weight
        student_model.reuse(teacher_model)

    def forward(self, student, teacher, batch):
        projected = student.features[FEATURE]
        target = pooled_to(teacher.features[FEATURE], projected.shape[-2:])
        feature = F.mse_loss(projected, target)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(self.ce_weight * ce, self.weight * feature, {"ce": ce, "feature": feature})
