import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled, soft_kl

NEGATIVES = ("all", "other_classes")
EPS = 1e-7  # the guard in the NCE ratios (RepDistiller crd/criterion.py ContrastLoss)


def sample_negatives(anchors: torch.Tensor, labels: torch.Tensor | None, num_train: int, k: int) -> torch.Tensor:
    """(b, k) training indices per anchor, drawn uniformly without replacement with the global torch RNG from the
    other images (labels None) or the images of other classes: the k smallest of uniform keys over the eligible
    indices."""
    keys = torch.rand(len(anchors), num_train, device=anchors.device)
    if labels is None:
        keys.scatter_(1, anchors[:, None], 2.0)
    else:
        keys.masked_fill_(labels[None, :] == labels[anchors][:, None], 2.0)
    return keys.topk(k, dim=1, largest=False, sorted=False).indices


def nce_loss(p: torch.Tensor, num_train: int) -> torch.Tensor:
    """Tian et al.'s NCE loss of (b, 1 + K) probabilities, column 0 the positive, noise Pn = 1 / num_train:
    -(sum_n log(P_pos / (P_pos + K Pn + eps)) + sum_{n,k} log(K Pn / (P_neg + K Pn + eps))) / b."""
    noise = (p.shape[1] - 1) / num_train
    positive = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    negative = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(positive.sum() + negative.sum()) / len(p)


class ContrastiveRepresentationDistillation(DistillationLoss):
    """Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699), with the
    memory bank and NCE loss of the authors' code (RepDistiller crd/).

    Linear heads + L2 norm embed the pooled features: v_s, v_t. Two banks keep one student and one teacher
    embedding per training image. Each image i is contrasted with its own bank row (positive) and K negatives j:
    e_s(j) = exp(v_s . M_t[j] / nce_t), e_t(j) = exp(v_t . M_s[j] / nce_t); P = e / Z, with Z = mean(e) *
    num_train fixed at the first batch, one per side; CRD = NCE(P_s) + NCE(P_t) (see `nce_loss`). Then
    M[i] <- normalize(nce_m M[i] + (1 - nce_m) v). loss = CE(z_s, y) + weight * CRD + kd_weight * T^2 KL.
    All in fp32 (the trainer hands losses fp32 outputs with autocast off; heads and banks are fp32): exp(1 / 0.07)
    = 1.6e6 would overflow fp16.
    """

    argument_ranges = {"weight": "[0, inf)", "kd_weight": "[0, inf)", "kd_temperature": "(0, inf)",
                       "feat_dim": "[1, inf)", "nce_k": "[1, inf)", "nce_t": "(0, inf)", "nce_m": "[0, 1]"}

    def __init__(self, weight: float, kd_weight: float, kd_temperature: float, feat_dim: int, nce_k: int,
                 nce_t: float, nce_m: float, negatives: str, feature: str, feature_shapes, num_train: int,
                 train_labels: torch.Tensor):
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"crd_nce: negatives {negatives!r} is not one of {list(NEGATIVES)}")
        self.weight, self.kd_weight, self.kd_temperature = weight, kd_weight, kd_temperature
        self.nce_t, self.nce_m, self.negatives, self.feature = nce_t, nce_m, negatives, feature
        self.num_train, self.nce_k = num_train, nce_k
        labels = torch.as_tensor(train_labels)
        available = num_train - (1 if negatives == "all" else int(labels.bincount().max()))
        if available < 1:
            raise ValueError(f"crd_nce: no negatives to draw with negatives={negatives!r} from {num_train} training "
                             f"images; negatives=all needs 2 images, other_classes 2 classes")
        self.k = min(nce_k, available)
        self.student_head = nn.Linear(feature_shapes["student"][feature][0], feat_dim)
        self.teacher_head = nn.Linear(feature_shapes["teacher"][feature][0], feat_dim)
        bound = 1 / math.sqrt(feat_dim / 3)  # rows of norm about 1 (RepDistiller crd/memory.py)
        self.register_buffer("memory_student", torch.rand(num_train, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_train, feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative until the first batch sets them
        self.register_buffer("labels", labels.long(), persistent=False)

    def scale_note(self) -> str:
        capped = f" (nce_k {self.nce_k} capped: only {self.k} eligible)" if self.k < self.nce_k else ""
        bank_mb = 2 * self.memory_student.numel() * self.memory_student.element_size() / 1e6
        pool = "images of other classes" if self.negatives == "other_classes" else "other images"
        return (f"crd_nce: {self.k} negatives per image from the {pool}{capped}; memory banks of {self.num_train} "
                f"x {self.memory_student.shape[1]} x 2 = {bank_mb:.1f} MB")

    def forward(self, student, teacher, batch):
        anchors = batch.indices.to(self.memory_student.device)
        v_s = F.normalize(self.student_head(pooled(student.features[self.feature])), dim=1)
        v_t = F.normalize(self.teacher_head(pooled(teacher.features[self.feature])), dim=1)
        negatives = sample_negatives(anchors, self.labels if self.negatives == "other_classes" else None,
                                     self.num_train, self.k)
        contrast = torch.cat([anchors[:, None], negatives], dim=1)  # column 0: the positive
        e_s = torch.exp((v_s @ self.memory_teacher.t()).gather(1, contrast) / self.nce_t)
        e_t = torch.exp((v_t @ self.memory_student.t()).gather(1, contrast) / self.nce_t)
        with torch.no_grad():
            z = torch.where(self.z < 0, torch.stack([e_s.mean(), e_t.mean()]) * self.num_train, self.z)
            self.z.copy_(z)
            # out of place: the products above keep the banks as they were for the backward pass
            self.memory_student = self._updated(self.memory_student, anchors, v_s)
            self.memory_teacher = self._updated(self.memory_teacher, anchors, v_t)
        crd = nce_loss(e_s / z[0], self.num_train) + nce_loss(e_t / z[1], self.num_train)
        ce = F.cross_entropy(student.logits, batch.labels)
        terms = {"ce": ce, "crd": crd}
        distillation = self.weight * crd
        if self.kd_weight:
            terms["kd"] = self.kd_temperature**2 * soft_kl(student.logits, teacher.logits, self.kd_temperature)
            distillation = distillation + self.kd_weight * terms["kd"]
        return LossParts(ce, distillation, terms)

    def _updated(self, memory: torch.Tensor, anchors: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A new bank: row i <- normalize(nce_m * row i + (1 - nce_m) * v_i) for each anchor i."""
        return memory.index_copy(0, anchors, F.normalize(self.nce_m * memory[anchors] + (1 - self.nce_m) * v, dim=1))
