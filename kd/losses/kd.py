import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, soft_kl


class VanillaKD(DistillationLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)
    """

    def __init__(self, temperature: float, alpha: float):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        kd = self.temperature**2 * soft_kl(student.logits, teacher.logits, self.temperature)
        return LossParts((1 - self.alpha) * ce, self.alpha * kd, {"ce": ce, "kd": kd})
