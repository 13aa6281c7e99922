"""What the methods with a stage before distillation share (FSP and AB initialise the student's feature layers
through connectors, FT pre-trains a paraphraser of the teacher): the stage's SGD loop, weights trained only in
that stage, and which student layers a feature loss reaches.

Weights trained only in the stage (`stage_only`) are buffers, not parameters: saved and restored with the loss
and moved with it, but never in the student's optimizer, which the trainer builds from the parameters before
the stage runs (the reference code leaves them out of its main optimizer too). `run_stage` makes them
trainable while it runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kd.losses.base import DistillationLoss, Preparation, pooled_to
from kd.losses.batch import Batch
from kd.taps import Outputs, TappedModel


def stage_only(module: nn.Module) -> nn.Module:
    """`module` with each parameter re-registered as a buffer of the same name (names in `module.stage_weights`)."""
    names = []
    for prefix, sub in module.named_modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach().clone())
            names.append(f"{prefix}.{name}" if prefix else name)
    module.stage_weights = names
    return module


def stage_weights(module: nn.Module) -> list[torch.Tensor]:
    return [module.get_buffer(name) for name in module.stage_weights]


def connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """AB's connector (Heo et al.'s code): 1x1 conv + BN to the teacher's channels; the identity when they match."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels))


def common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps average-pooled to the smaller height and width of the two (the larger one pooled, as RepDistiller)."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    return pooled_to(a, size), pooled_to(b, size)


def guided_parameters(student: TappedModel, images: torch.Tensor, features: list[str]) -> list[nn.Parameter]:
    """The student's parameters that `features` depend on: its layers up to the deepest guided feature, never the
    classifier (RepDistiller's `model_s.get_feat_modules()` for its feature lists). Found with autograd on one
    eval-mode forward, so no BatchNorm statistics move."""
    was_training = student.training
    student.eval()
    try:
        params = [p for p in student.parameters() if p.requires_grad]
        features_out = student(images).features
        grads = torch.autograd.grad(sum(features_out[name].float().sum() for name in features), params,
                                    allow_unused=True)
    finally:
        student.train(was_training)
    return [p for p, g in zip(params, grads) if g is not None]


@contextmanager
def modes_kept(*modules: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode restored afterwards."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def train_only(student: nn.Module, parameters: list[nn.Parameter]) -> None:
    """The student in eval mode except the modules owning `parameters`: their BatchNorms use and update batch
    statistics, the layers after them stay as they are (RepDistiller: `model_s.eval(); init_modules.train()`)."""
    owned = {id(p) for p in parameters}
    student.eval()
    for m in student.modules():
        if any(id(p) in owned for p in m.parameters(recurse=False)):
            m.train()


STAGE_RANGES = {"prepare_epochs": "[0, inf)", "prepare_lr": "(0, inf)", "prepare_momentum": "[0, 1)",
                "prepare_weight_decay": "[0, inf)"}
"""`argument_ranges` of a stage's YAML arguments (`run_stage`'s epochs, 0 for no stage, and SGD settings; a momentum
of 1 would never let a gradient fade)."""


def run_stage(preparation: Preparation, name: str, epochs: int, trainable: Callable[[Batch], list[torch.Tensor]],
              step_loss: Callable[[Batch, Outputs], torch.Tensor], sgd: dict) -> None:
    """`epochs` passes over the run's training batches (the first epochs' order and augmentation): SGD with
    `sgd` (lr, momentum, weight_decay; constant lr, as RepDistiller's `init`) on `step_loss(batch, teacher)`
    over `trainable(first batch)`. Logs each epoch's mean loss; stops on a non-finite one."""
    optimizer, weights = None, []
    try:
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for batch, teacher in preparation.batches(epoch):
                if optimizer is None:
                    tensors = trainable(batch)
                    weights = [t for t in tensors if not t.requires_grad]  # stage-only buffers
                    for t in weights:
                        t.requires_grad_(True)
                    optimizer = torch.optim.SGD(tensors, **sgd)
                loss = step_loss(batch, teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.detach() * len(batch.labels), seen + len(batch.labels)
            mean = float(total / max(seen, 1))
            if not math.isfinite(mean):
                raise FloatingPointError(f"{name}: the preparation loss became non-finite in epoch {epoch + 1}; "
                                         f"a smaller method.loss.prepare_lr (now {sgd['lr']:g}) may help")
            preparation.log(f"{name} epoch {epoch + 1}/{epochs}: {mean:.4f}")
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        for t in weights:
            t.requires_grad_(False)


def initialise_student(preparation: Preparation, name: str, features: list[str], connectors: nn.Module,
                       stage_loss: Callable[[Outputs, Outputs], torch.Tensor], epochs: int, sgd: dict) -> None:
    """FSP's and AB's initialisation (RepDistiller `helper/pretrain.py`, `init`): the student's layers up to the
    deepest guided feature and the connectors, trained on `stage_loss(student outputs, teacher outputs)` alone.
    The classifier, any student layer after the guided features and the teacher stay as they are."""
    student = preparation.student

    def trainable(batch: Batch) -> list[torch.Tensor]:
        params = guided_parameters(student, batch.images, features)
        train_only(student, params)
        return [*params, *stage_weights(connectors)]

    def step_loss(batch: Batch, teacher: Outputs) -> torch.Tensor:
        with preparation.autocast():
            outputs = student(batch.images)
        return stage_loss(outputs.float(), teacher)  # in fp32, as the main stage's losses

    with modes_kept(student, connectors):
        connectors.train()
        run_stage(preparation, name, epochs, trainable, step_loss, sgd)


class StudentInitialisation(DistillationLoss):
    """What FSP and AB share: stage-only 1x1 connectors from the student's features to the teacher's channels,
    trained with the student's guided layers on `distance` alone in the preparation, fixed (eval mode) after it."""

    label = ""
    argument_ranges = STAGE_RANGES

    def __init__(self, features: list[str], feature_shapes, prepare_epochs: int, prepare_lr: float,
                 prepare_momentum: float, prepare_weight_decay: float):
        super().__init__()
        self.features, self.prepare_epochs = list(features), prepare_epochs
        self.sgd = {"lr": prepare_lr, "momentum": prepare_momentum, "weight_decay": prepare_weight_decay}
        student, teacher = feature_shapes["student"], feature_shapes["teacher"]
        self.connectors = stage_only(nn.ModuleList(connector(student[f][0], teacher[f][0]) for f in self.features))
        self.connectors.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.connectors.eval()  # fixed after the preparation: BN with the statistics it learnt there
        return self

    def distance(self, student: dict, teacher: dict) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, preparation):
        initialise_student(preparation, self.label, self.features, self.connectors,
                           lambda s, t: self.distance(s.features, t.features), self.prepare_epochs, self.sgd)
