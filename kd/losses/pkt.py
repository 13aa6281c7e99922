import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, off_diagonal, pooled

KERNELS = ("softmax", "cosine")
EPS = 1e-7  # the cosine kernel's guard in the norms and the log ratio (the authors' nn/pkt.py, RepDistiller PKT.py)


def neighbour_log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise log-softmax of cosine similarities / temperature, each sample's similarity to itself removed."""
    x = F.normalize(x, dim=1)
    similarity = off_diagonal(x @ x.t())
    return F.log_softmax(similarity / temperature, dim=1)


def cosine_probs(x: torch.Tensor) -> torch.Tensor:
    """Passalis & Tefas's kernel: cosine similarities mapped to [0, 1] by (cos + 1) / 2, itself included, each
    row divided by its sum."""
    x = x / (x.norm(dim=1, keepdim=True) + EPS)
    similarity = (x @ x.t() + 1) / 2
    return similarity / similarity.sum(1, keepdim=True)


class PKT(DistillationLoss):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
    (arXiv:1803.10837).

    kernel "softmax": P_ij = softmax_j(cos(x_i, x_j) / temperature), j != i, on pooled features of each network;
    PKT = mean_i KL(P_t,i || P_s,i).
    kernel "cosine" (the paper's, as the authors' code and RepDistiller compute it; no temperature):
    P_ij = K_ij / sum_j K_ij with K_ij = (cos(x_i, x_j) + 1) / 2, j = i included;
    PKT = mean over all b^2 entries of P_t log((P_t + eps) / (P_s + eps)), eps = 1e-7: (1/b) mean_i KL(P_t,i || P_s,i).
    loss = CE(z_s, y) + weight * PKT.
    """

    argument_ranges = {"temperature": "(0, inf)", "weight": "[0, inf)"}

    def __init__(self, temperature: float | None, weight: float, feature: str, kernel: str):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"pkt: kernel {kernel!r} is not one of {list(KERNELS)}")
        if (temperature is None) != (kernel == "cosine"):
            raise ValueError(f"pkt: the softmax kernel needs a temperature and the cosine kernel has none (kernel "
                             f"{kernel!r}, temperature {temperature}); conf/method/pkt_cosine.yaml is the cosine form")
        self.temperature, self.weight, self.feature, self.kernel = temperature, weight, feature, kernel

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        s, t = pooled(student.features[self.feature]), pooled(teacher.features[self.feature])
        if self.kernel == "cosine":
            p_s, p_t = cosine_probs(s), cosine_probs(t)
            pkt = (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
        elif len(s) < 2:
            pkt = s.sum() * 0.0
        else:
            log_ps, log_pt = neighbour_log_probs(s, self.temperature), neighbour_log_probs(t, self.temperature)
            pkt = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
        return LossParts(ce, self.weight * pkt, {"ce": ce, "pkt": pkt})
