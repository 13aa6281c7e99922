import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled
from kd.losses.nkd import label_mask, non_target_log_softmax


def zipf_labels(weak_logits: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft non-target labels by Zipf's law: each class ranked (1-based, over all classes, the label included) by
    the authors' score w_c / (1 - w_y + 1e-6) + log S_c / (1 - log S_y + 1e-6), w = softmax(weak_logits),
    log S = `log_p`; weight 1 / rank, 0 for the label, normalised over the other classes. No gradient."""
    w, y = F.softmax(weak_logits, dim=1), labels[:, None]
    w_y, log_p_y = w.gather(1, y), log_p.gather(1, y)
    score = w / (1 - w_y + 1e-6) + log_p / (1 - log_p_y + 1e-6)
    rank = score.argsort(dim=1, descending=True).argsort(dim=1) + 1
    weights = rank.to(log_p.dtype).reciprocal().masked_fill(label_mask(log_p, labels), 0.0)
    return weights / weights.sum(1, keepdim=True)


class USKD(DistillationLoss):
    """USKD, universal self-knowledge distillation (no teacher): Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge
    Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
    Labels", ICCV 2023 (arXiv:2303.13005), as the authors' USKDLoss computes it.

    S = softmax(z_s); a linear head on the pooled intermediate feature f (the student's penultimate stage) gives
    weak logits z_w = W f + b, w = softmax(z_w).
      soft target  p_i = S_y,i^2 + 1 - mean_batch(S_y^2)                                 (constant)
      target       = -mean_i p_i log S_y,i
      non_target   = -mean_i sum_{c != y} Z_c log N(S)_c,  Z = `zipf_labels` (constant),  N(S)_c = S_c / (1 - S_y)
      weak         = CE of z_w on labels smoothed by eps: (1 - eps) onehot(y) + eps / C
    loss = ce_weight * CE(z_s, y) + alpha * target + beta * non_target + mu * weak
    The head trains with the student, and its gradient reaches the student's intermediate feature.
    """

    needs_teacher = False
    argument_ranges = {"ce_weight": "[0, inf)", "alpha": "[0, inf)", "beta": "[0, inf)", "mu": "[0, inf)",
                       "weak_label_smoothing": "[0, 1]"}

    def __init__(self, ce_weight: float, alpha: float, beta: float, mu: float, weak_label_smoothing: float,
                 feature: str, feature_shapes, num_classes: int):
        super().__init__()
        self.ce_weight, self.alpha, self.beta, self.mu = ce_weight, alpha, beta, mu
        self.weak_label_smoothing, self.feature = weak_label_smoothing, feature
        self.head = nn.Linear(feature_shapes["student"][feature][0], num_classes)

    def forward(self, student, teacher, batch):
        z_s, labels = student.logits, batch.labels
        ce = F.cross_entropy(z_s, labels)
        gt = label_mask(z_s, labels)
        log_p = F.log_softmax(z_s, dim=1)
        log_p_y = log_p.gather(1, labels[:, None])
        confidence = log_p_y.detach().exp() ** 2
        target = -((confidence + 1 - confidence.mean()) * log_p_y).mean()
        weak_logits = self.head(pooled(student.features[self.feature]))
        weak = F.cross_entropy(weak_logits, labels, label_smoothing=self.weak_label_smoothing)
        soft = zipf_labels(weak_logits.detach(), log_p.detach(), labels)
        non_target = -(soft * non_target_log_softmax(z_s, gt, 1.0)).sum(1).mean()
        distillation = self.alpha * target + self.beta * non_target + self.mu * weak
        return LossParts(self.ce_weight * ce, distillation,
                         {"ce": ce, "target": target, "non_target": non_target, "weak": weak})
