"""Checks of the composed config that must fail before any training, with the value and what is valid."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


MIN_TRAIN_IMAGES = 2  # a batch with batch statistics and sample pairs


def _positive_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} is invalid: it must be a whole number >= 1")


def _positive(value, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{key}={value!r} is invalid: it must be a number > 0")


def validate_optim(optim: DictConfig, prefix: str) -> None:
    _positive_int(optim.batch_size, f"{prefix}.batch_size")
    _positive(optim.optimizer.lr, f"{prefix}.optimizer.lr")


def validate(cfg: DictConfig) -> None:
    _positive_int(cfg.kd_epochs, "kd_epochs")
    validate_optim(cfg.optim, "optim")
    validate_optim(cfg.teacher_training.optim, "teacher_training.optim")
    _positive_int(cfg.teacher_training.epochs, "teacher_training.epochs")
    _positive_int(cfg.trainer.eval_batch_size, "trainer.eval_batch_size")
    fraction = cfg.data.val_fraction
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction={fraction!r} is invalid: it must lie strictly between 0 and 1")
    subset = cfg.data.train_subset
    if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool) or subset < MIN_TRAIN_IMAGES):
        raise ConfigError(f"data.train_subset={subset!r} is invalid: it must be a whole number >= {MIN_TRAIN_IMAGES} "
                          "(batch statistics and the relational methods, rkd, crd, pkt, need two images; null keeps "
                          "the whole training split)")
    _finite_numbers(OmegaConf.to_container(cfg.method.loss, resolve=True), "method.loss")


def _finite_numbers(node, key: str) -> None:
    """No NaN or infinity among a loss's arguments: it would only show as a non-finite loss after the data, teacher
    and cache work, without naming the key."""
    if isinstance(node, dict):
        for name, value in node.items():
            _finite_numbers(value, f"{key}.{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _finite_numbers(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}={node!r} is invalid: it must be a finite number")
