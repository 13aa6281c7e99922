import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts


def label_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The one-hot mask (bool, B x C) of each sample's label."""
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)


def non_target_log_softmax(logits: torch.Tensor, gt: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) over the classes other than the label (N(p) of the paper: p_c / (1 - p_gt)), with 0 in
    the label's column, so that a weight of 0 there adds nothing and passes no gradient."""
    return F.log_softmax((logits / temperature).masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)


def target_term(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-T_y log S_y of each row: the student's log-probability of the label weighted by the teacher's (T = 1)."""
    y = labels[:, None]
    return -(F.softmax(z_t, dim=1).gather(1, y) * F.log_softmax(z_s, dim=1).gather(1, y))[:, 0]


def non_target_term(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """-T^2 sum_{c != y} N(T^T)_c log N(S^T)_c of each row: both distributions at temperature T, renormalised over
    the classes other than the label."""
    gt = label_mask(z_s, labels)
    soft = F.softmax((z_t / temperature).masked_fill(gt, float("-inf")), dim=1)
    return -temperature**2 * (soft * non_target_log_softmax(z_s, gt, temperature)).sum(1)


class NKD(DistillationLoss):
    """NKD, normalized KD: Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (arXiv:2303.13005).

    T_c = softmax(z_t)_c, S_c = softmax(z_s)_c (no temperature); N(p^T)_c = p^T_c / sum_{k != y} p^T_k over the
    non-target classes c != y, p^T = softmax(z / T).
      target     = -mean_i T_y log S_y
      non_target = -T^2 mean_i sum_{c != y} N(T^T)_c log N(S^T)_c
    loss = ce_weight * CE(z_s, y) + target + gamma * non_target      (the authors' NKDLoss, cross-entropy form:
    non_target is KL(N(T^T) || N(S^T)) plus the teacher's non-target entropy, a constant of the student)
    """

    argument_ranges = {"ce_weight": "[0, inf)", "gamma": "[0, inf)", "temperature": "(0, inf)"}

    def __init__(self, ce_weight: float, gamma: float, temperature: float):
        super().__init__()
        self.ce_weight, self.gamma, self.temperature = ce_weight, gamma, temperature

    def forward(self, student, teacher, batch):
        z_s, z_t, labels = student.logits, teacher.logits, batch.labels
        ce = F.cross_entropy(z_s, labels)
        target = target_term(z_s, z_t, labels).mean()
        non_target = non_target_term(z_s, z_t, labels, self.temperature).mean()
        return LossParts(self.ce_weight * ce, target + self.gamma * non_target,
                         {"ce": ce, "target": target, "non_target": non_target})
