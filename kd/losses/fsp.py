import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import LossParts
from kd.losses.init_stage import StudentInitialisation, common_size


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """G[n, a, c] = mean over positions of top[n, a] * bottom[n, c] (the larger map average-pooled first)."""
    bottom, top = common_size(bottom, top)
    return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / (bottom.shape[2] * bottom.shape[3])


class FSP(StudentInitialisation):
    """Flow of solution procedure (Yim, Joo, Bae & Kim, A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning, CVPR 2017; no arXiv version), as RepDistiller runs it.

    For consecutive features F_1..F_n of each network (the larger map of a pair average-pooled to the smaller),
    G_i = F_i F_{i+1}^T / (h w), a C_{i+1} x C_i matrix per image, and
    fsp = sum_i mean_{n, a, c} (G_i^S - G_i^T)^2.
    Preparation (RepDistiller `init`): `prepare_epochs` epochs of SGD on fsp alone over the student's layers up to
    the last guided feature and the connectors. Main stage: L = CE(z_s, y) + weight * fsp (weight 0 in
    RepDistiller: the main stage is plain cross-entropy). Where a student map's channels differ from the teacher's,
    a 1x1 conv + BN connector (trained only in the preparation, fixed after it) maps it to the teacher's channels
    (RepDistiller refuses such pairs).
    """

    label = "fsp"
    argument_ranges = {**StudentInitialisation.argument_ranges, "weight": "[0, inf)"}

    def __init__(self, weight: float, prepare_epochs: int, prepare_lr: float, prepare_momentum: float,
                 prepare_weight_decay: float, features: list[str], feature_shapes):
        if len(features) < 2:
            raise ValueError(f"fsp: FSP matrices need at least two consecutive features; got {list(features)}, "
                             "e.g. [stem, stage-3, stage-2, stage-1]")
        super().__init__(features, feature_shapes, prepare_epochs, prepare_lr, prepare_momentum, prepare_weight_decay)
        self.weight = weight

    def distance(self, student: dict, teacher: dict) -> torch.Tensor:
        s = [c(student[f]) for c, f in zip(self.connectors, self.features)]
        t = [teacher[f] for f in self.features]
        return sum(F.mse_loss(fsp_matrix(s[i], s[i + 1]), fsp_matrix(t[i], t[i + 1])) for i in range(len(s) - 1))

    def scale_note(self) -> str:
        mapped = [f for f, c in zip(self.features, self.connectors) if not isinstance(c, nn.Identity)]
        return (f"fsp: {self.prepare_epochs} epoch(s) of FSP alone on the student's layers before its epochs, then "
                f"weight {self.weight:g}; connectors to the teacher's channels on {mapped or 'no feature'}")

    def forward(self, student, teacher, batch):
        fsp = self.distance(student.features, teacher.features)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * fsp, {"ce": ce, "fsp": fsp})
