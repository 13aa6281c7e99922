import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled_to


def regressor(in_channels: int, mid_channels: int, out_channels: int) -> nn.Module:
    """The predicted mean: 1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv, no biases."""
    return nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(mid_channels, out_channels, 1, bias=False))


class VariationalInformationDistillation(DistillationLoss):
    """Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge Transfer",
    CVPR 2019 (arXiv:1904.05835).

    For each stage pair, the teacher's map t is modelled as a Gaussian given the student's map s: mean mu = R(s)
    (a trainable regressor), one variance per teacher channel, var_c = softplus(alpha_c) + eps (alpha trainable,
    initialised so var starts at init_variance). Maps of different size are compared at the smaller size (the
    larger is average-pooled). VID = sum over stages of mean over (n, c, h, w) of
    0.5 * ((t - mu)^2 / var_c + log var_c) (the Gaussian NLL without its constant; it can be negative);
    loss = CE(z_s, y) + weight * VID.
    """

    argument_ranges = {"weight": "[0, inf)", "init_variance": "(0, inf)", "eps": "(0, inf)"}

    def __init__(self, weight: float, init_variance: float, eps: float, features: list, feature_shapes):
        super().__init__()
        self.weight, self.eps, self.features = weight, eps, list(features)
        self.sizes, regressors, log_scales = [], [], []
        for name in self.features:
            student, teacher = feature_shapes["student"][name], feature_shapes["teacher"][name]
            if len(student) != 3 or len(teacher) != 3:
                raise ValueError(f"vid: feature {name!r} must be a C x H x W map in both networks (student "
                                 f"{student}, teacher {teacher}); use stage taps such as stage-1, stage2, feat")
            self.sizes.append((min(student[1], teacher[1]), min(student[2], teacher[2])))
            regressors.append(regressor(student[0], teacher[0], teacher[0]))
            # softplus(alpha) + eps = init_variance at the start
            log_scales.append(nn.Parameter(torch.full((teacher[0],), math.log(math.expm1(init_variance - eps)))))
        self.regressors, self.log_scales = nn.ModuleList(regressors), nn.ParameterList(log_scales)

    def forward(self, student, teacher, batch):
        terms = {}
        for name, size, predict, alpha in zip(self.features, self.sizes, self.regressors, self.log_scales):
            mean = predict(pooled_to(student.features[name], size))
            target = pooled_to(teacher.features[name], size)
            variance = (F.softplus(alpha) + self.eps).view(1, -1, 1, 1)
            terms[f"vid_{name}"] = (0.5 * ((target - mean).pow(2) / variance + variance.log())).mean()
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * sum(terms.values()), {"ce": ce, **terms})
