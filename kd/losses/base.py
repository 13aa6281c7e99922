"""The contract every method's loss follows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.taps import Outputs

FeatureShapes = dict[str, dict[str, tuple[int, ...]]]
"""{"student": {"feat": (C, H, W)}, "teacher": {...}}: shapes of the tapped features, per sample."""


class DistillationLoss(nn.Module):
    """A method = one of these: (student outputs, teacher outputs, labels) -> (total loss, named terms).

    Subclasses take their hyperparameters as constructor arguments (given in `conf/method/<name>.yaml`) and
    `feature_shapes`, which the trainer measures with one probe batch, so trainable parts (projectors, heads)
    can be sized for any teacher/student pair. Trainable parts live in the loss and are optimised with the
    student. `teacher` is None when the loss declares `needs_teacher = False`.
    """

    needs_teacher = True

    def __init__(self, feature_shapes: FeatureShapes | None = None):
        super().__init__()
        self.epoch, self.num_epochs = 0, 1

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the trainer before each epoch (0-based), for schedules such as a ramped weight."""
        self.epoch, self.num_epochs = epoch, num_epochs

    def forward(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor):
        raise NotImplementedError


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling of an NCHW feature map (identity for already-flat features)."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), log_target=True, reduction="batchmean")
