import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


class FocalKD(DistillationLoss):
    """Focal KD: the KL term re-weighted towards classes the student is not yet confident in.

    FKD = T^2 * mean_batch sum_c (1 - p_s,c)^gamma * p_t,c * (log p_t,c - log p_s,c),  p = softmax(z / T)
    loss = CE(z_s, y) + weight * FKD
    """

    argument_ranges = {"temperature": "(0, inf)", "gamma": "[0, inf)", "weight": "[0, inf)"}

    def __init__(self, temperature: float, gamma: float, weight: float):
        super().__init__()
        self.temperature, self.gamma, self.weight = temperature, gamma, weight

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        log_ps = F.log_softmax(student.logits / self.temperature, dim=1)
        log_pt = F.log_softmax(teacher.logits / self.temperature, dim=1)
        focal = (1 - log_ps.exp()).pow(self.gamma)
        fkd = self.temperature**2 * (focal * log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
        return LossParts(ce, self.weight * fkd, {"ce": ce, "fkd": fkd})
