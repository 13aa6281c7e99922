import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd.losses.base import DistillationLoss, LossParts, soft_kl


class DeepMutualLearning(DistillationLoss):
    """Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384): no teacher; the student
    and a peer of the same architecture, trained from scratch together, each learns from the labels and from the
    other's predictions.

    L_student = CE(z_s, y) + w * T^2 * KL(softmax(z_p/T) || softmax(z_s/T))      (z_p a constant here)
    L_peer    = CE(z_p, y) + w * T^2 * KL(softmax(z_s/T) || softmax(z_p/T))      (z_s a constant here)
    loss = L_student + L_peer

    The peer is a trainable part of this loss (built from `peer_arch`, the student's architecture, after the
    student, so the seed fixes both initialisations), stepped by the student's optimizer and saved with the
    loss. Each term reads the other network's logits detached, so one backward pass gives each network the
    gradient of its own loss: the paper's Algorithm 1 updates the two in turn within a step, recomputing the
    second network's target after the first update; updating both at once is this harness's departure.
    """

    needs_teacher = False
    argument_ranges = {"weight": "[0, inf)", "temperature": "(0, inf)"}

    def __init__(self, peer_arch: DictConfig, normalization: DictConfig, weight: float, temperature: float):
        super().__init__()
        self.weight, self.temperature = weight, temperature
        self.peer = instantiate(peer_arch)
        self.register_buffer("mean", torch.tensor(list(normalization.mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(normalization.std)).view(1, -1, 1, 1))

    def forward(self, student, teacher, batch):
        z_s = student.logits
        z_p = self.peer((batch.images - self.mean) / self.std).to(z_s.dtype)  # fp32 under autocast, as z_s
        ce, ce_peer = F.cross_entropy(z_s, batch.labels), F.cross_entropy(z_p, batch.labels)
        scale = self.temperature**2
        mutual = scale * soft_kl(z_s, z_p.detach(), self.temperature)
        mutual_peer = scale * soft_kl(z_p, z_s.detach(), self.temperature)
        peer_acc = (z_p.detach().argmax(1) == batch.labels).float().mean()
        return LossParts(ce + ce_peer, self.weight * (mutual + mutual_peer),
                         {"ce": ce, "mutual": mutual, "ce_peer": ce_peer, "mutual_peer": mutual_peer,
                          "peer_acc": peer_acc})
