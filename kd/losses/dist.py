import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts

EPS = 1e-8
"""Added to the product of the two norms in the Pearson coefficient, as the authors' `cosine_similarity`
(hunto/image_classification_sota lib/models/losses/dist_kd.py). A class that is near 0 across the whole batch
has centred norms near 0, so its correlation falls towards 0 even when y_s == y_t: the loss of identical, very
confident inputs is then not exactly 0 (tests/test_loss_dist.py shows a case)."""


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: <a', b'> / (|a'| |b'| + eps), x' = x - mean."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


class DIST(DistillationLoss):
    """Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022 (arXiv:2205.10536).

    y = softmax(z / tau) per sample;
    inter = tau^2 * (1 - mean_i pearson(y_s[i, :], y_t[i, :]))   (each sample's relation across the classes)
    intra = tau^2 * (1 - mean_c pearson(y_s[:, c], y_t[:, c]))   (each class's relation across the batch)
    loss = ce_weight * CE(z_s, y) + weight * (beta * inter + gamma * intra)
    The tau^2 factors follow the authors' released loss. intra depends on the whole batch, not a mean of samples.
    """

    argument_ranges = {"ce_weight": "[0, inf)", "weight": "[0, inf)", "beta": "[0, inf)", "gamma": "[0, inf)",
                       "tau": "(0, inf)"}

    def __init__(self, ce_weight: float, weight: float, beta: float, gamma: float, tau: float):
        super().__init__()
        self.ce_weight, self.weight, self.beta, self.gamma, self.tau = ce_weight, weight, beta, gamma, tau

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        y_s = F.softmax(student.logits / self.tau, dim=1)
        y_t = F.softmax(teacher.logits / self.tau, dim=1)
        inter = self.tau**2 * (1 - pearson_rows(y_s, y_t).mean())
        intra = self.tau**2 * (1 - pearson_rows(y_s.t(), y_t.t()).mean())
        dist = self.beta * inter + self.gamma * intra
        return LossParts(self.ce_weight * ce, self.weight * dist, {"ce": ce, "inter": inter, "intra": intra})
