"""For the methods with a preparation stage (FSP, AB, FT): that stage on a few fixed batches, with a real SmallNet
student and a random ResNet-20 teacher tapped as the trainer hands them to `DistillationLoss.prepare` (16x16 images,
to stay fast); and the numpy form of their 1x1 conv + BN connectors."""
import contextlib
import copy

import numpy as np
import torch

from conftest import compose_config
from kd.data import Batch, Progress
from kd.losses.base import Preparation
from kd.models import SmallNet, resnet20
from kd.taps import probe_shapes, tapped


class Stage:
    """The student, the teacher, the batches (the same every epoch), and snapshots to compare after `prepare`."""

    def __init__(self, taps: list[str], batches: int = 1, batch_size: int = 4, size: int = 16):
        cfg = compose_config(["model@model.student=smallnet", "model@model.teacher=resnet20"])
        torch.manual_seed(0)
        self.student = tapped(cfg.model.student, SmallNet(), taps)
        self.teacher = tapped(cfg.model.teacher, resnet20(), taps).eval().requires_grad_(False)
        self.shapes = {"student": probe_shapes(self.student, torch.device("cpu"), size),
                       "teacher": probe_shapes(self.teacher, torch.device("cpu"), size)}
        g = torch.Generator().manual_seed(1)
        self.batches = []
        for step in range(batches):
            images = torch.rand(batch_size, 3, size, size, generator=g)
            b = Batch(images, torch.randint(10, (batch_size,), generator=g), torch.arange(batch_size),
                      Progress(0, step, batches, 10))
            with torch.no_grad():  # batch statistics: features of a trained teacher's scale, not a random one's
                self.batches.append((b, self.teacher.train()(images).detached_float()))
        self.teacher.eval()
        self.messages: list[str] = []
        self.student_before = copy.deepcopy(self.student.model.state_dict())
        self.teacher_before = copy.deepcopy(self.teacher.model.state_dict())

    def preparation(self) -> Preparation:
        return Preparation(self.student, lambda epoch: iter(self.batches), contextlib.nullcontext, self.messages.append)

    def student_changes(self) -> dict[str, bool]:
        """For each entry of the student's state dict (parameters and BatchNorm statistics): did it change?"""
        return {k: not torch.equal(v, self.student.model.state_dict()[k]) for k, v in self.student_before.items()}

    def teacher_unchanged(self) -> bool:
        return all(torch.equal(v, self.teacher.model.state_dict()[k]) for k, v in self.teacher_before.items())

    def logged(self) -> list[float]:
        """The mean loss of each preparation epoch, as logged ("<name> epoch e/E: value")."""
        return [float(m.rsplit(": ", 1)[1]) for m in self.messages]


def randomise_batchnorm(bn: torch.nn.BatchNorm2d) -> None:
    """Statistics and affine parameters far from the identity, so a reference that ignores them fails."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)


def connected(connector, x):
    """numpy: a 1x1 conv (no bias) then an eval-mode BatchNorm, (W x - mean) / sqrt(var + eps) * gamma + beta."""
    conv, bn = connector
    w = conv.weight.detach().numpy()[:, :, 0, 0]
    mean, var, gamma, beta = (v.detach().numpy()[None, :, None, None]
                              for v in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return (np.einsum("oc,nchw->nohw", w, x) - mean) / np.sqrt(var + bn.eps) * gamma + beta
