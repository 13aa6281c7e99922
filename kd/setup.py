"""A run's setup, shared by the run (kd/run.py), the benchmark and the teacher tools: every check before
expensive work (`prepare`), the data splits, the networks and their loss, and the teacher's accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from hydra.utils import get_class, instantiate, to_absolute_path
from omegaconf import DictConfig

from kd import teacher as teachers
from kd import teacher_cache
from kd.data import Splits, build_splits
from kd.device import Acceleration, choose_precision, resolve_device
from kd.evaluation import logits_accuracy, teacher_predictions
from kd.io import tensors_sha256
from kd.losses.base import DistillationLoss, loss_factory
from kd.models import CIFAR_IMAGE_SIZE, build
from kd.taps import TappedModel, probe_shapes, resolve, tapped
from kd.validation import ConfigError, validate


@dataclass
class Prepared:
    """What a run has settled before any expensive work: where it runs, and how to build its loss."""

    device: torch.device
    dtype: torch.dtype
    acceleration: Acceleration
    loss_factory: Callable[..., DistillationLoss]
    precision_reason: str = ""


def prepare(cfg: DictConfig) -> Prepared:
    """Every check that needs no data and no teacher: bad input fails here, before any decoding or training."""
    validate(cfg)
    device = resolve_device(cfg.device)
    dtype, precision_reason = choose_precision(cfg.trainer.precision, device)
    if dtype == torch.float16 and hasattr(get_class(cfg.optim.optimizer._target_), "step_parts"):
        raise ConfigError(f"optim={cfg.optim.name} treats the task and distillation gradients apart, which the fp16 "
                          f"gradient scaler does not ({precision_reason}); use trainer.precision=fp32")
    acceleration = Acceleration.from_config(cfg.trainer)
    teacher_cache.check_settings(cfg.teacher_cache)
    teachers.check_checkpoint(cfg.model.teacher)
    try:
        factory = loss_factory(cfg.method.loss)
        check_student_wrapper(factory.loss_class, cfg)
        for role in ("student", "teacher"):
            for name in cfg.method.taps:
                resolve(name, cfg.model[role].taps, cfg.model[role].name)
    except ValueError as err:
        raise ConfigError(f"method={cfg.method.name}: {err}") from None
    return Prepared(device, dtype, acceleration, factory, precision_reason)


def check_student_wrapper(loss_class: type, cfg: DictConfig) -> None:
    """A loss that trains a student deployed inside a wrapper (`student_wrapper`: SimKD's reused teacher classifier)
    gets it, as its method YAML sets it, and no teacher assistant (whose distillation trains a plain network)."""
    needed = getattr(loss_class, "student_wrapper", None)
    if needed is None:
        return
    wrapper = cfg.model.student.get("wrapper")
    given = None if wrapper is None else get_class(wrapper._target_)
    if given is not needed:
        raise ValueError(f"{loss_class.__name__} trains the student deployed as {needed.__module__}.{needed.__name__}: "
                         f"model.student.wrapper must build one, as the method's YAML sets it (it is "
                         f"{'null' if given is None else given.__name__})")
    if cfg.method.get("assistant") is not None:
        raise ValueError(f"{loss_class.__name__} cannot train through a teacher assistant (method.assistant): the "
                         "assistant would be distilled without the wrapper; set method.assistant=null")


def load_splits(cfg: DictConfig, device: torch.device, train_subset: int | None) -> Splits:
    data = cfg.data
    load_source = instantiate(data.source, _partial_=True)  # called here so its DataError is not wrapped
    return build_splits(load_source(), data.val_fraction, data.split_seed, data.num_classes, train_subset, device)


def build_networks(cfg: DictConfig, prepared: Prepared, teacher_model: torch.nn.Module, train_labels: torch.Tensor,
                   normalize: bool = True, image_size: Sequence[int] = CIFAR_IMAGE_SIZE,
                   ) -> tuple[TappedModel, TappedModel, DistillationLoss]:
    """The student (initialised from `seed`), the teacher, both with the method's taps, and the loss sized for
    them at `image_size`, the training images' (height, width): `splits.train_x.shape[-2:]`. `normalize=False`
    leaves the input normalisation to the caller (the benchmark's classic loop)."""
    taps = list(cfg.method.taps)
    teacher = tapped(cfg.model.teacher, teacher_model, taps, normalize)
    torch.manual_seed(cfg.seed)
    student = tapped(cfg.model.student, build(cfg.model.student, image_size).to(prepared.device), taps, normalize)
    shapes = {"student": probe_shapes(student, prepared.device, image_size),
              "teacher": probe_shapes(teacher, prepared.device, image_size)}
    loss = prepared.loss_factory(feature_shapes=shapes, num_classes=cfg.data.num_classes, num_train=len(train_labels),
                                 train_labels=train_labels, teacher_model=teacher_model, teacher_taps=dict(teacher.taps),
                                 student_model=student.model, student_taps=dict(student.taps))
    return student, teacher, loss.to(prepared.device)


def split_digests(splits: Splits) -> dict[str, str]:
    """The sha256 of the test and of the validation split (images and labels): what kept predictions are keyed by."""
    return {"test": tensors_sha256(splits.test_x, splits.test_y), "val": tensors_sha256(splits.val_x, splits.val_y)}


def teacher_accuracy(cfg: DictConfig, teacher_model: torch.nn.Module, weights_sha256: str, splits: Splits,
                     split_sha256: dict[str, str], dtype: torch.dtype) -> dict[str, float]:
    """The teacher's test and validation accuracy, from its predictions kept in the teacher cache (computed there
    once per teacher and split)."""
    directory = to_absolute_path(cfg.teacher_cache.dir) if cfg.teacher_cache.enabled else None
    return {split: logits_accuracy(teacher_predictions(cfg.model.teacher, teacher_model, weights_sha256, x,
                                                       split_sha256[split], cfg.trainer.eval_batch_size, dtype,
                                                       directory, f"teacher on the {split} split").logits, y)
            for split, x, y in (("test", splits.test_x, splits.test_y), ("val", splits.val_x, splits.val_y))}
