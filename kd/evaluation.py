"""Forward passes over a whole split, without augmentation; a frozen teacher's computed once and kept."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kd.data import eval_batches
from kd.device import autocast, numerics
from kd.io import cache_unwritable, file_sha256, load_kept, save_checked, save_json
from kd.progress import tracked
from kd.taps import TappedModel, tapped

EMBED = "embed"


@dataclass
class Predictions:
    logits: torch.Tensor
    embed: torch.Tensor | None  # the pooled vector the classifier reads (the model config's `embed` tap), flattened


@torch.inference_mode()
def predict(net: TappedModel, images: torch.Tensor, batch_size: int, dtype: torch.dtype,
            description: str = "") -> Predictions:
    """Logits over a split, in eval mode, in the run's precision, and the embeddings where `net` taps `embed`;
    a `description` shows the progress of a long pass."""
    was_training = net.training
    net.eval()
    logits, embed = [], []
    with autocast(images.device, dtype):
        batches = eval_batches(images, images, batch_size)
        for x, _ in tracked(batches, -(-len(images) // batch_size), description):
            out = net(x)
            logits.append(out.logits.float())
            if EMBED in out.features:
                embed.append(out.features[EMBED].float().flatten(1))
    net.train(was_training)
    return Predictions(torch.cat(logits), torch.cat(embed) if embed else None)


def accuracy(model: TappedModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             dtype: torch.dtype, description: str = "") -> float:
    return logits_accuracy(predict(model, images, batch_size, dtype, description).logits, labels)


def logits_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def embedded_predictions(model_cfg: DictConfig, model: torch.nn.Module, images: torch.Tensor, batch_size: int,
                         dtype: torch.dtype, description: str = "") -> Predictions:
    """A model's logits and embeddings over a split, through its own normalisation and `embed` tap."""
    net = tapped(model_cfg, model, [EMBED])
    try:
        return predict(net, images, batch_size, dtype, description)
    finally:
        net.close()


def teacher_predictions(model_cfg: DictConfig, model: torch.nn.Module, weights_sha256: str, images: torch.Tensor,
                        images_sha256: str, batch_size: int, dtype: torch.dtype,
                        directory: str | Path | None, description: str = "") -> Predictions:
    """A frozen teacher's logits and embeddings on a whole split (whose images and labels hash to
    `images_sha256`: `tensors_sha256(images, labels)`), kept in `directory/predictions/` so that every later run
    and report with the same weights, architecture, normalisation, split, batch size and numerics reads them
    instead of evaluating the teacher again (a minute for ResNet-56 on 10,000 CPU images). No directory:
    computed."""
    def compute() -> Predictions:
        return embedded_predictions(model_cfg, model, images, batch_size, dtype, description)
    if directory is None:
        return compute()
    key = {"weights": weights_sha256, "arch": OmegaConf.to_container(model_cfg.arch, resolve=True),
           "normalization": OmegaConf.to_container(model_cfg.normalization, resolve=True),
           "images": images_sha256, "batch_size": batch_size, **numerics(images.device, dtype)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(directory) / "predictions" / f"{digest}.pt"
    kept = load_kept(path, "computing the teacher's predictions again", map_location=images.device)
    if kept is not None:
        return Predictions(**kept)
    predictions = compute()
    try:
        # racing jobs write the same bits
        save_checked({"logits": predictions.logits.cpu(), "embed": predictions.embed.cpu()}, path)
        save_json(key, path.with_suffix(".json"))
    except OSError as err:
        cache_unwritable("teacher cache (split predictions)", path, err)
    return predictions


def _kept_key(weights: Path, images_sha256: str) -> dict:
    return {"weights": file_sha256(weights), "images": images_sha256}


def keep_predictions(predictions: Predictions, weights: Path, images_sha256: str, path: Path) -> None:
    """A run's own test-set predictions, saved beside its weights so that the report reads them instead of
    evaluating every student again; they are valid for exactly these weights and these test images."""
    save_checked({"logits": predictions.logits.cpu(), "embed": predictions.embed.cpu(),
                  "key": _kept_key(weights, images_sha256)}, path)


def kept_predictions(weights: Path, images_sha256: str, path: Path, device: torch.device) -> Predictions | None:
    """What `keep_predictions` saved, or None when there is none, it is unreadable, or the weights or the test
    images are not the ones it was made from."""
    kept = load_kept(path, "evaluating the student's weights instead", map_location=device)
    if kept is None or kept["key"] != _kept_key(weights, images_sha256):
        return None
    return Predictions(kept["logits"], kept["embed"])
