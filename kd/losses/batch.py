"""What a loss sees of a training step besides the two networks' outputs: the batch and its place in the run."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Progress:
    """Where a training step sits in the run: 0-based epoch and step, steps per epoch, epochs in all, and
    `epochs_done`, the epochs completed once this step is done (0.5 = half of the first epoch), as a 0-dim
    tensor: schedules computed from it stay tensors, so a compiled step reads a new value each step instead of
    being compiled again for it (the trainer hands one on the training device; by default it is made here)."""

    epoch: int
    step: int
    steps: int
    epochs: int
    epochs_done: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.epochs_done is None:
            object.__setattr__(self, "epochs_done", torch.tensor(self.epoch + (self.step + 1) / self.steps))


@dataclass(frozen=True)
class Batch:
    """Augmented images in [0, 1], their labels, their positions in the training split, and (set by the
    trainer) the step's progress through the run."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    progress: Progress | None = None

