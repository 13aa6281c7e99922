"""Forward passes over a whole split, without augmentation; a frozen teacher's computed once and kept."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kd.data import eval_batches
from kd.device import autocast, numerics
from kd.io import save_json, save_torch, tensors_sha256
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
    return logits_accuracy(predict_logits(model, images, batch_size, dtype), labels)


def logits_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def teacher_logits(model: TappedModel, model_cfg: DictConfig, weights_sha256: str, images: torch.Tensor,
                   labels: torch.Tensor, batch_size: int, dtype: torch.dtype, directory: str | Path | None) -> torch.Tensor:
    """A frozen teacher's logits on a whole split, kept in `directory/logits/` so that every later run and report
    with the same weights, architecture, normalisation, split, batch size and numerics reads them instead of
    evaluating the teacher again (a minute for ResNet-56 on 10,000 CPU images). No directory: computed."""
    if directory is None:
        return predict_logits(model, images, batch_size, dtype)
    key = {"weights": weights_sha256, "arch": OmegaConf.to_container(model_cfg.arch, resolve=True),
           "normalization": OmegaConf.to_container(model_cfg.normalization, resolve=True),
           "images": tensors_sha256(images, labels), "batch_size": batch_size, **numerics(images.device, dtype)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(directory) / "logits" / f"{digest}.pt"
    try:
        return torch.load(path, map_location=images.device, weights_only=True)
    except FileNotFoundError:
        pass
    except Exception:  # unreadable: computed again below and replaced
        path.unlink(missing_ok=True)
    logits = predict_logits(model, images, batch_size, dtype)
    save_torch(logits.cpu(), path)  # two jobs racing here write the same bits; os.replace keeps one
    save_json(key, path.with_suffix(".json"))
    return logits
