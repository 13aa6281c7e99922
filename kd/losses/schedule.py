"""Warm-up schedules shared by every loss whose weight grows at the start of training."""
from __future__ import annotations

import math

import torch

from kd.losses.batch import Progress


def ramp(progress: Progress | None, epochs: float | None = None, fraction: float | None = None) -> torch.Tensor | float:
    """Linear warm-up factor: t / R after t epochs of training (counted per step), 1 from t = R on.

    R is `epochs`, or `fraction` of the run's epochs (so a warm-up of 20 of 240 epochs is `fraction=1/12`,
    whatever `kd_epochs` is). R = 0: no warm-up. Because t advances per step, a one-epoch run still ramps.
    At the end of epoch e (1-based) the factor is min(1, e / R). A 0-dim tensor (from `progress.epochs_done`);
    1.0 without progress (a loss evaluated outside training) or without warm-up.
    """
    if (epochs is None) == (fraction is None):
        raise ValueError("ramp: give exactly one of epochs or fraction")
    if progress is None:
        return 1.0
    length = epochs if epochs is not None else fraction * progress.epochs
    if length <= 0:
        return 1.0
    return (progress.epochs_done / length).clamp(max=1.0)


def cosine_ramp(progress: Progress | None, fraction: float) -> float:
    """0 -> 1 along half a cosine over `fraction` of the run, then 1: (1 - cos(pi * r)) / 2 with r the linear
    warm-up factor of `ramp` (epochs done counted per step; 1 without progress)."""
    return 0.5 * (1.0 - torch.cos(math.pi * torch.as_tensor(ramp(progress, fraction=fraction))))
