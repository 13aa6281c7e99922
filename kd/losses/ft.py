from collections import OrderedDict
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts
from kd.losses.init_stage import STAGE_RANGES, common_size, run_stage, stage_only, stage_weights


def conv_stack(channels: list[int], transposed: bool = False) -> nn.Sequential:
    """3x3 convs (stride 1, padding 1, with bias) between consecutive channel counts, each followed by
    LeakyReLU(0.1), as the authors' Paraphraser and Translator (no BatchNorm)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers = []
    for cin, cout in pairwise(channels):
        layers += [conv(cin, cout, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FactorTransfer(DistillationLoss):
    """Factor transfer (Kim, Park & Kwak, Paraphrasing Complex Network: Network Compression via Factor Transfer,
    NeurIPS 2018, arXiv:1802.04977), as the authors' code computes it.

    Preparation: a paraphraser (encoder: 3x3 convs C_t -> C_t -> kC_t -> kC_t; decoder: the transposed convs
    back) learns to reconstruct the teacher's feature map, loss mean |P(F_t) - F_t|, for `prepare_epochs`
    epochs of SGD; it is fixed afterwards. Main stage: a translator T (3x3 convs C_s -> C_s -> kC_t -> kC_t)
    on the student's map, and with f(x) = x / ||x||_2 over each image's whole k C_t x H x W factor,
    L = CE(z_s, y) + beta * mean |f(T(F_s)) - f(E(F_t))|   (the mean over batch and factor elements).
    Factors of different spatial size: the larger is average-pooled to the smaller (RepDistiller).
    """

    argument_ranges = {**STAGE_RANGES, "beta": "[0, inf)", "rate": "(0, inf)"}

    def __init__(self, beta: float, rate: float, prepare_epochs: int, prepare_lr: float, prepare_momentum: float,
                 prepare_weight_decay: float, feature: str, feature_shapes):
        super().__init__()
        self.beta, self.feature, self.prepare_epochs = beta, feature, prepare_epochs
        self.sgd = {"lr": prepare_lr, "momentum": prepare_momentum, "weight_decay": prepare_weight_decay}
        student_channels, *student_size = feature_shapes["student"][feature]
        teacher_channels, *teacher_size = feature_shapes["teacher"][feature]
        factor = round(teacher_channels * rate)
        if factor < 1:
            raise ValueError(f"ft: rate {rate} leaves no factor channel of the teacher's {teacher_channels}; "
                             f"use a rate of at least {1 / teacher_channels:.3g}")
        self.paraphraser = stage_only(nn.Sequential(OrderedDict(
            encoder=conv_stack([teacher_channels, teacher_channels, factor, factor]),
            decoder=conv_stack([factor, factor, teacher_channels, teacher_channels], transposed=True))))
        self.translator = conv_stack([student_channels, student_channels, factor, factor])
        self.factor_size = factor * min(student_size[0], teacher_size[0]) * min(student_size[1], teacher_size[1])

    def reconstruction(self, teacher_features: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.paraphraser(teacher_features), teacher_features)

    def prepare(self, preparation):
        """The authors' train_Paraphraser.py: the paraphraser alone; the student and the translator are untouched."""
        run_stage(preparation, "ft paraphraser", self.prepare_epochs, lambda batch: stage_weights(self.paraphraser),
                  lambda batch, teacher: self.reconstruction(teacher.features[self.feature]), self.sgd)

    def scale_note(self) -> str:
        bound = 2 / self.factor_size ** 0.5
        return (f"ft: factors compared as {self.factor_size} values per image; the mean |difference| of two unit "
                f"vectors is at most 2/sqrt({self.factor_size}) = {bound:.4g}, so beta {self.beta:g} bounds the term "
                f"by {self.beta * bound:.4g}")

    def forward(self, student, teacher, batch):
        factor_s = self.translator(student.features[self.feature])
        factor_t = self.paraphraser.encoder(teacher.features[self.feature])
        factor_s, factor_t = common_size(factor_s, factor_t)
        ft = F.l1_loss(F.normalize(factor_s.flatten(1), dim=1), F.normalize(factor_t.flatten(1), dim=1))
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.beta * ft, {"ce": ce, "ft": ft})
