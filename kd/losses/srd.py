import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import BatchNorm1d, DistillationLoss, LossParts, pooled, soft_kl


class SRD(DistillationLoss):
    """Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024
    (arXiv:2303.11098), as the authors' released loss computes it (roymiles/Simple-Recipe-Distillation
    imagenet/torchdistill/losses/single.py, OurDistillationLoss).

    e_s, e_t = the two networks' pooled embeddings; P = a trainable linear projector (with bias) to the teacher's
    width; BN = batch normalisation over the batch without affine parameters (eps `eps`), one for each side;
    d = BN(P(e_s)) - BN(e_t) (B x D):
        rep = log( sum over b, j of |d_bj|^exponent )     (a soft maximum of the per-entry distances)
        kd = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch
        loss = CE(z_s, y) + weight * rep + kd_weight * kd.
    The logarithm makes rep scale-free: its gradient is that of the sum divided by the sum. It is -inf where the
    normalised embeddings agree exactly (the released loss adds no epsilon there). A batch of one sample is
    normalised with the running statistics.
    """

    argument_ranges = {"weight": "[0, inf)", "exponent": "(0, inf)", "eps": "(0, inf)", "kd_weight": "[0, inf)",
                       "temperature": "(0, inf)"}

    def __init__(self, weight: float, exponent: float, eps: float, kd_weight: float, temperature: float,
                 feature: str, feature_shapes):
        super().__init__()
        self.weight, self.exponent, self.kd_weight, self.temperature = weight, exponent, kd_weight, temperature
        self.feature = feature
        student_dim, teacher_dim = (feature_shapes[side][feature][0] for side in ("student", "teacher"))
        self.projector = nn.Linear(student_dim, teacher_dim)
        self.student_norm = BatchNorm1d(teacher_dim, eps=eps, affine=False)
        self.teacher_norm = BatchNorm1d(teacher_dim, eps=eps, affine=False)

    def scale_note(self) -> str:
        return (f"srd: weight {self.weight:g} multiplies the log of a sum, so it acts on the relative change of the "
                f"summed |distance|^{self.exponent:g}; the batch size B and the width D shift the term by about "
                f"log(B x D)")

    def representation(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
        """log sum |BN(P(e_s)) - BN(e_t)|^exponent."""
        difference = self.student_norm(self.projector(student_embedding)) - self.teacher_norm(teacher_embedding)
        return difference.abs().pow(self.exponent).sum().log()

    def forward(self, student, teacher, batch):
        e_s, e_t = pooled(student.features[self.feature]), pooled(teacher.features[self.feature]).detach()
        rep = self.representation(e_s, e_t)
        kd = self.temperature**2 * soft_kl(student.logits, teacher.logits.detach(), self.temperature)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * rep + self.kd_weight * kd, {"ce": ce, "srd": rep, "kd": kd})
