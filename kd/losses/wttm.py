import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


class WTTM(DistillationLoss):
    """Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024 (arXiv:2402.11148).

    The teacher's distribution p_t = softmax(z_t) is power-transformed, q = p_t^gamma / U with
    U = sum_c p_t,c^gamma (so q = softmax(gamma * z_t): a teacher-side temperature 1/gamma, none on the student);
    WTTM = mean_i U_i * KL(q_i || softmax(z_s)_i)   (no T^2; U_i >= 1 for gamma < 1, larger for smoother teachers)
    loss = ce_weight * CE(z_s, y) + beta * WTTM
    Computed in log space: log q = log_softmax(gamma * z_t), log U = logsumexp_c(gamma * log_softmax(z_t)).
    """

    argument_ranges = {"ce_weight": "[0, inf)", "gamma": "(0, inf)", "beta": "[0, inf)"}

    def __init__(self, ce_weight: float, gamma: float, beta: float):
        super().__init__()
        self.ce_weight, self.gamma, self.beta = ce_weight, gamma, beta

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        log_q = F.log_softmax(self.gamma * teacher.logits, dim=1)
        log_u = (self.gamma * F.log_softmax(teacher.logits, dim=1)).logsumexp(dim=1)
        kl = F.kl_div(F.log_softmax(student.logits, dim=1), log_q, log_target=True, reduction="none").sum(dim=1)
        wttm = (log_u.exp() * kl).mean()
        return LossParts(self.ce_weight * ce, self.beta * wttm, {"ce": ce, "wttm": wttm})
