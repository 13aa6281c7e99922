import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled_to
from kd.taps import INPUT, module_path


def gaussian_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(beta, gamma^2), or -3|gamma| where P(x < 0) <= 1e-3 (the authors'
    cut-off). gamma = 0 gives the limits: beta for beta < 0, else 0."""
    std, mean = gamma.double().abs(), beta.double()
    z = mean / std
    below = torch.special.ndtr(-z)  # P(x < 0)
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    conditional = mean - std * density / below
    return torch.where(below > 1e-3, conditional, -3 * std)


def batchnorm_before(model: nn.Module, spec: str) -> nn.BatchNorm2d | None:
    """The BatchNorm whose output a pre-activation tap sees: the tapped BatchNorm itself, or else the last
    BatchNorm2d registered before the tapped module in its parent (a block's `bn2` before its `relu`, SmallNet's
    last BatchNorm before its max-pool). Registration order is the forward order in the harness's models."""
    path = module_path(spec)
    tapped = model.get_submodule(path)
    if isinstance(tapped, nn.BatchNorm2d) and not spec.endswith(INPUT):
        return tapped
    parent_path, _, name = path.rpartition(".")
    found = None
    for child_name, child in model.get_submodule(parent_path).named_children():
        if child_name == name:
            return found
        if isinstance(child, nn.BatchNorm2d):
            found = child
    return None


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1x1 conv + BN to the teacher's channels; conv weights N(0, 2 / (k*k*C_out)), BN weight 1, bias 0."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def common_size(name: str, student: tuple[int, ...], teacher: tuple[int, ...]) -> tuple[int, int]:
    """The smaller of the two maps' sizes, to which the larger one is average-pooled; it must divide it."""
    size = (min(student[1], teacher[1]), min(student[2], teacher[2]))
    for shape in (student, teacher):
        if shape[1] % size[0] or shape[2] % size[1]:
            raise ValueError(f"ofd: feature {name!r} is {student[1]}x{student[2]} in the student and "
                             f"{teacher[1]}x{teacher[2]} in the teacher; the larger map is average-pooled to the "
                             f"smaller, so one size must divide the other. Pair other stages (e.g. stage-k names).")
    return size


class OFD(DistillationLoss):
    """Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019
    (arXiv:1904.01866), as the authors' CIFAR-100 code (clovaai/overhaul-distillation) computes it.

    For each listed pre-ReLU feature i = 0..n-1 (shallow to deep): s = connector_i(student feature) (1x1 conv +
    BN), t = the teacher's (eval mode, detached), the larger map average-pooled to the smaller's size;
    t' = max(t, m) with the per-channel margin m = E[x | x < 0] of N(beta, gamma^2), from the weight gamma and
    bias beta of the teacher BatchNorm before the tapped ReLU (-3|gamma| where P(x < 0) <= 1e-3), and
        L_i = sum over B*C*H*W of (s - t')^2 * [s > t' or t' > 0]          (partial L2)
        loss = CE(z_s, y) + weight * sum_i L_i / (B * 2^(n-1-i)).
    The margins are read from `teacher_model` here, before the trainer folds the teacher's BatchNorms.
    """

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float, features: list[str], teacher_taps: Mapping[str, str], feature_shapes,
                 teacher_model: nn.Module):
        super().__init__()
        self.weight, self.features = weight, list(features)
        self.sizes, self.connectors = [], nn.ModuleList()
        for i, name in enumerate(self.features):
            student, teacher = feature_shapes["student"][name], feature_shapes["teacher"][name]
            self.sizes.append(common_size(name, student, teacher))
            self.connectors.append(connector(student[0], teacher[0]))
            self.register_buffer(f"margin{i}", self._margin(name, teacher[0], dict(teacher_taps), teacher_model))

    @staticmethod
    def _margin(name: str, channels: int, taps: dict[str, str], teacher_model: nn.Module) -> torch.Tensor:
        if not name.endswith("_preact"):
            raise ValueError(f"ofd: feature {name!r} is not a pre-activation; OFD distils the features before "
                             f"each stage's last ReLU: use stageK_preact names (e.g. stage-1_preact)")
        spec = taps[name]
        bn = batchnorm_before(teacher_model, spec)
        if bn is None or bn.num_features != channels or bn.weight is None:
            raise ValueError(f"ofd: the teacher's {name!r} taps {spec!r}, and no affine BatchNorm2d with {channels} "
                             f"channels is registered before it in its parent module; OFD's margins come from the "
                             f"BatchNorm that feeds the tapped ReLU (a block's last BatchNorm, e.g. layer3.2.bn2 "
                             f"for layer3.2.relu:input)")
        margin = gaussian_margin(bn.weight.detach(), bn.bias.detach())
        return margin.to(torch.get_default_dtype()).view(1, -1, 1, 1)

    def scale_note(self) -> str:
        n = len(self.features)
        stages = ", ".join(f"{name} x{2.0 ** (i + 1 - n):g}" for i, name in enumerate(self.features))
        return (f"ofd: partial L2 summed over each sample's teacher values ({stages}), averaged over the batch; "
                f"weight {self.weight:g} acts per unit of that sum")

    def forward(self, student, teacher, batch):
        n, distance = len(self.features), 0.0
        for i, name in enumerate(self.features):
            s = pooled_to(self.connectors[i](student.features[name]), self.sizes[i])
            t = pooled_to(teacher.features[name].detach(), self.sizes[i])
            t = torch.maximum(t, getattr(self, f"margin{i}"))
            partial_l2 = ((s - t).pow(2) * ((s > t) | (t > 0))).sum() / len(s)
            distance = distance + partial_l2 / 2 ** (n - 1 - i)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * distance, {"ce": ce, "ofd": distance})
