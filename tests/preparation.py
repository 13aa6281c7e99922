"""For the methods with a preparation stage (FSP, AB, FT): that stage on a few fixed batches, with a real SmallNet
student and a random ResNet-20 teacher tapped as the trainer hands them to `DistillationLoss.prepare` (16x16 images,
to stay fast); and the numpy form of their 1x1 conv + BN connectors."""
import contextlib
import copy

import numpy as np
import torch

from conftest import compose_config
from kd.losses.base import Preparation
from kd.losses.batch import Batch, Progress
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

    def check_guided_preparation(self, loss, guided: tuple[str, ...], name: str, epochs: int) -> None:
        """Run `loss.prepare` on the student in train mode, then check that it trained the guided layers (weights
        and BatchNorm statistics) and the loss's connectors only, left the connectors out of the student's
        optimizer and in eval mode, and logged a falling loss once per epoch."""
        assert list(loss.parameters()) == []  # the connectors are not in the student's optimizer
        connectors_before = {k: v.clone() for k, v in loss.connectors.state_dict().items()}
        self.student.train()
        loss.prepare(self.preparation())
        changed = self.student_changes()
        for key, moved in changed.items():
            assert moved == key.startswith(guided), key
        assert not any(changed[k] for k in ("fc.weight", "fc.bias"))
        assert self.teacher_unchanged()
        assert all(not torch.equal(v, loss.connectors.state_dict()[k]) for k, v in connectors_before.items()
                   if not k.endswith("num_batches_tracked"))
        assert not any(b.requires_grad for b in loss.connectors.buffers()) and list(loss.parameters()) == []
        assert self.student.training and not any(m.training for m in loss.connectors.modules())
        assert [m.split(":")[0] for m in self.messages] == [f"{name} epoch {e}/{epochs}" for e in range(1, epochs + 1)]
        assert self.logged()[-1] < self.logged()[0]

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
