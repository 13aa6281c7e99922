"""Forward passes over a whole split, without augmentation."""
from __future__ import annotations

import torch

from kd.data import eval_batches
from kd.device import autocast
from kd.taps import TappedModel


@torch.inference_mode()
def predict_logits(model: TappedModel, images: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with autocast(images.device, dtype):
        logits = torch.cat([model(x).logits.float() for x, _ in eval_batches(images, images, batch_size)])
    model.train(was_training)
    return logits


def accuracy(model: TappedModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             dtype: torch.dtype) -> float:
    if len(labels) == 0:
        return float("nan")
    logits = predict_logits(model, images, batch_size, dtype)
    return (logits.argmax(1) == labels).sum().item() / len(labels)
