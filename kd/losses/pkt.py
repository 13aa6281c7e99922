import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, pooled


def neighbour_log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise log-softmax of cosine similarities / temperature, each sample's similarity to itself removed."""
    x = F.normalize(x, dim=1)
    n = len(x)
    similarity = (x @ x.t())[~torch.eye(n, dtype=torch.bool, device=x.device)].view(n, n - 1)
    return F.log_softmax(similarity / temperature, dim=1)


class PKT(DistillationLoss):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".

    P_ij = softmax_j(cos(x_i, x_j) / temperature), j != i, on pooled features of each network;
    PKT = mean_i KL(P_t,i || P_s,i); loss = CE(z_s, y) + weight * PKT.
    """

    def __init__(self, temperature: float, weight: float, feature: str):
        super().__init__()
        self.temperature, self.weight, self.feature = temperature, weight, feature

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        s, t = pooled(student.features[self.feature]), pooled(teacher.features[self.feature])
        if len(s) < 2:
            pkt = s.sum() * 0.0
        else:
            log_ps, log_pt = neighbour_log_probs(s, self.temperature), neighbour_log_probs(t, self.temperature)
            pkt = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
        return LossParts(ce, self.weight * pkt, {"ce": ce, "pkt": pkt})
