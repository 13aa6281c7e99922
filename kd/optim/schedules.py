"""Learning-rate schedules written in fractions of the run, so one recipe serves every `kd_epochs`."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import MultiStepLR


def step_decay(optimizer: torch.optim.Optimizer, epochs: int, fractions: list[float], gamma: float) -> MultiStepLR:
    """The learning rate times `gamma` after each fraction of `epochs` (stepped once per epoch): the KD
    benchmark's 150, 180, 210 of 240 epochs are fractions 0.625, 0.75, 0.875, i.e. epochs 6, 8, 9 of 10."""
    if sorted(fractions) != list(fractions) or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"step_decay: fractions={list(fractions)} must increase and lie strictly between 0 and 1")
    return MultiStepLR(optimizer, [round(f * epochs) for f in fractions], gamma)
