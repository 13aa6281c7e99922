"""The contract every method's loss follows, and how the harness builds one from its YAML."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.losses.batch import Batch
from kd.taps import Outputs, TappedModel

FeatureShapes = dict[str, dict[str, tuple[int, ...]]]
"""{"student": {"feat": (C, H, W)}, "teacher": {...}}: shapes of the tapped features, per sample."""

PROVIDED = ("feature_shapes", "num_classes", "num_train", "train_labels", "teacher_model", "teacher_taps",
            "student_model", "student_taps")
"""Constructor arguments the harness fills in when a loss names them (never written in the YAML):
`feature_shapes` (measured with one probe batch), `num_classes`, `num_train` (training images: the size of a
memory bank indexed by `batch.indices`), `train_labels` (the label of every training image, by index) and
`teacher_model` (the frozen teacher network, for a loss that reads its parameters, e.g. BatchNorm statistics;
read them in `__init__`: the trainer may fold the teacher's BatchNorms into its convolutions afterwards) and
`teacher_taps` (each of the method's feature names -> the teacher's tap spec, e.g. `layer3.8.relu:input`);
`student_model` and `student_taps` the same for the student (a loss that applies the student's own classifier to
its feature maps; never register the student as a submodule of the loss: its parameters are the student's)."""


class LossParts(NamedTuple):
    """A loss's value, split so an optimizer can treat the two gradients apart and the log can show both.

    `task`: the weighted task loss (cross-entropy on the labels); `distillation`: the weighted sum of every
    term that involves the teacher; `terms`: named, unweighted values for the log.
    """

    task: torch.Tensor
    distillation: torch.Tensor
    terms: dict[str, torch.Tensor]

    @property
    def total(self) -> torch.Tensor:
        return self.task + self.distillation


@dataclass
class Preparation:
    """What a loss's `prepare` gets: the student, the training batches of an epoch with the frozen teacher's
    outputs for them (from the shared cache when it has them), the run's autocast, and the run's log."""

    student: TappedModel
    batches: Callable[[int], Iterable[tuple[Batch, Outputs]]]
    autocast: Callable[[], ContextManager]
    log: Callable[[str], None]


class DistillationLoss(nn.Module):
    """A method = one of these: (student outputs, teacher outputs, batch) -> LossParts.

    Subclasses take their hyperparameters as constructor arguments, all given in `conf/method/<name>.yaml`,
    plus any of `PROVIDED` they need. Trainable parts (projectors, heads) and buffers (memory banks) live in
    the loss: they are optimised with the student and saved in `student.pt` and the training state.
    `teacher` is None when the loss declares `needs_teacher = False`. `batch.progress` says where the step
    sits in the run (for warm-ups: `kd.losses.schedule.ramp`).
    """

    needs_teacher = True
    student_wrapper: type | None = None
    """The class the student must be deployed in (`model.student.wrapper`, kd.models.build) for this loss: SimKD's
    reused teacher classifier. Checked before any data or teacher work; None: any student."""
    argument_ranges: dict[str, str] = {}
    """Each numeric YAML argument's valid values as an interval, `(0, inf)`, `[0, 1]`, `[1, inf)`: checked (with the
    items of a list argument) before any data or teacher work, so a bad value is named, not met as a non-finite
    loss. Arguments not listed are only required to be finite."""

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> LossParts:
        raise NotImplementedError

    def prepare(self, preparation: Preparation) -> None:
        """Runs once, before the student's first epoch (a pre-training stage: FT's paraphraser, AB's
        initialisation). Its time is reported apart from the student's; a run killed during it redoes it."""

    @property
    def has_preparation(self) -> bool:
        """A loss that defines `prepare`, unless it counts its preparation in `prepare_epochs` and that is 0."""
        return type(self).prepare is not DistillationLoss.prepare and getattr(self, "prepare_epochs", None) != 0

    def scale_note(self) -> str | None:
        """How strongly the loss's weight acts for these feature shapes, printed at the start of a run."""
        return None


def loss_factory(loss_cfg: DictConfig) -> Callable[..., DistillationLoss]:
    """The loss class with its YAML arguments bound; call it with the `PROVIDED` values it asks for.

    Checks, without building anything, that `_target_` imports and that every argument in the YAML is one
    the class takes and none it needs is missing, so a misspelt method YAML fails before any teacher work.
    """
    try:
        partial = instantiate(loss_cfg, _partial_=True)
    except InstantiationException as err:
        raise ValueError(f"method.loss: {err}") from None
    cls = partial.func
    parameters = inspect.signature(cls).parameters
    given = {k for k in OmegaConf.to_container(loss_cfg) if not k.startswith("_")}  # not Hydra's _target_, ...
    accepted = [p for p in parameters if p not in PROVIDED]
    unknown = sorted(given - set(parameters))
    if unknown:
        raise ValueError(f"method.loss: {cls.__name__} takes no argument {unknown}; its arguments are {accepted}")
    missing = sorted(name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in given | set(PROVIDED))
    if missing:
        raise ValueError(f"method.loss: {cls.__name__} needs {missing}; set them in the method's YAML")
    check_ranges(cls, OmegaConf.to_container(loss_cfg, resolve=True))

    def build(**provided) -> DistillationLoss:
        return partial(**{name: value for name, value in provided.items() if name in parameters})
    build.loss_class = cls
    return build


def check_ranges(cls: type, arguments: dict) -> None:
    """Every argument a loss class declares a range for (`argument_ranges`) lies in it; a list argument's items too."""
    for name, interval in cls.argument_ranges.items():
        if name not in arguments or arguments[name] is None:
            continue
        value = arguments[name]
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not in_interval(item, interval):
                raise ValueError(f"method.loss.{name}={value!r} is invalid: {cls.__name__}'s {name} must lie in "
                                 f"{interval}")


def in_interval(value: float, interval: str) -> bool:
    """`value` in an interval written `[a, b]`, `(a, b)`, `[a, b)` or `(a, b]`, with `inf` for no bound."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling of an NCHW feature map (identity for already-flat features)."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


class _BatchStatisticsWherePossible:
    """BatchNorm that normalises a training batch holding one value per channel (a batch of one vector, or of
    one 1x1 map), which has no batch statistics, with its running statistics instead of failing."""

    def forward(self, x):
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class BatchNorm1d(_BatchStatisticsWherePossible, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchStatisticsWherePossible, nn.BatchNorm2d):
    pass


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of an n x n matrix, row by row, as n x (n - 1): by reshaping, not by a boolean
    mask, whose result size the host would have to wait for."""
    n = len(matrix)
    return matrix.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def pooled_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An NCHW feature map average-pooled to `size` (height, width), unless it has that size already."""
    return features if tuple(features.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(features, size)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), log_target=True, reduction="batchmean")
