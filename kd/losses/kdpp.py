import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import BatchNorm1d, DistillationLoss, LossParts, Preparation, pooled, soft_kl
from kd.losses.schedule import ramp


def embedding_projector(student_dim: int, teacher_dim: int, dropout: float) -> nn.Module:
    """The authors' EmbTrans: BN -> Dropout -> Linear (bias starting at 0) to the teacher's width."""
    linear = nn.Linear(student_dim, teacher_dim)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(BatchNorm1d(student_dim), nn.Dropout(dropout), linear)


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class sum of the embeddings, per-class count), in float64."""
    sums = embeddings.new_zeros(num_classes, embeddings.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, embeddings.double())
    counts = sums.new_zeros(num_classes).index_add_(0, labels, sums.new_ones(len(labels)))  # no host sync
    return sums, counts


class KDPlusPlus(DistillationLoss):
    """KD++: KD with the ND (norm and direction) loss (Wang, Cheng, Duan, Wang, Feng & Kong, "Improving Knowledge
    Distillation via Regularizing Feature Direction and Norm", ECCV 2024; arXiv:2305.17007).

    c_y = the teacher's mean embedding of class y over the training set (measured once, in `prepare`, from the
    teacher's embeddings of epoch 0's augmented batches); f_s = P(student embedding), P the authors' EmbTrans
    projector when the widths differ (identity otherwise); f_t = the teacher's embedding.
      ND = mean_i [ 1 - <f_s,i, c_y_i / ||c_y_i||> / max(||f_s,i||, ||f_t,i||) ]
    loss = ce_weight * CE(z_s, y) + r(t) * kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + nd_weight * ND,
    r(t) = min(1, t / (kd_ramp_fraction * epochs)) after t epochs of training, counted per step (ND is not ramped).
    A class whose mean has not been measured (a loss called without `prepare`) uses its mean in the batch.
    """

    argument_ranges = {"temperature": "(0, inf)", "ce_weight": "[0, inf)", "kd_weight": "[0, inf)",
                       "nd_weight": "[0, inf)", "kd_ramp_fraction": "[0, 1]", "dropout": "[0, 1)"}

    def __init__(self, temperature: float, ce_weight: float, kd_weight: float, nd_weight: float,
                 kd_ramp_fraction: float, dropout: float, feature: str, feature_shapes, num_classes: int):
        super().__init__()
        self.temperature, self.ce_weight, self.kd_weight, self.nd_weight = temperature, ce_weight, kd_weight, nd_weight
        self.kd_ramp_fraction, self.feature, self.num_classes = kd_ramp_fraction, feature, num_classes
        student_dim, teacher_dim = (feature_shapes[side][feature][0] for side in ("student", "teacher"))
        self.projector = (embedding_projector(student_dim, teacher_dim, dropout) if student_dim != teacher_dim
                          else nn.Identity())
        self.register_buffer("class_means", torch.zeros(num_classes, teacher_dim))

    @torch.no_grad()
    def prepare(self, preparation: Preparation) -> None:
        sums = counts = 0
        for batch, teacher in preparation.batches(0):
            batch_sums, batch_counts = class_sums(pooled(teacher.features[self.feature]), batch.labels,
                                                  self.num_classes)
            sums, counts = sums + batch_sums, counts + batch_counts
        self.class_means.copy_(sums / counts.clamp(min=1)[:, None])
        preparation.log(f"teacher class means of '{self.feature}' from {int(counts.sum())} training images, "
                        f"{int((counts > 0).sum())} of {self.num_classes} classes")

    def directions(self, teacher_embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unit class-mean direction of each sample's label."""
        centres = self.class_means[labels]
        unmeasured = centres.abs().sum(1) == 0
        sums, counts = class_sums(teacher_embeddings, labels, self.num_classes)  # always: no host sync to skip it
        batch_means = (sums / counts.clamp(min=1)[:, None]).to(centres.dtype)
        return F.normalize(torch.where(unmeasured[:, None], batch_means[labels], centres), dim=1)

    def forward(self, student, teacher, batch):
        f_s = self.projector(pooled(student.features[self.feature]))
        f_t = pooled(teacher.features[self.feature])
        direction = self.directions(f_t, batch.labels)
        scale = torch.maximum(f_s.norm(dim=1), f_t.norm(dim=1)).clamp(min=1e-12)  # as F.normalize: no 0/0
        nd = (1 - (f_s * direction).sum(1) / scale).mean()
        kd = self.temperature**2 * soft_kl(student.logits, teacher.logits, self.temperature)
        ce = F.cross_entropy(student.logits, batch.labels)
        kd_weight = self.kd_weight * ramp(batch.progress, fraction=self.kd_ramp_fraction)
        return LossParts(self.ce_weight * ce, kd_weight * kd + self.nd_weight * nd, {"ce": ce, "kd": kd, "nd": nd})
