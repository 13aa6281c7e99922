import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, pooled_to


def generation_block(channels: int) -> nn.Sequential:
    """The authors' generator G: 3x3 conv -> ReLU -> 3x3 conv, at the teacher's width, with biases."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


class MGD(DistillationLoss):
    """Yang, Li, Shao, Shi, Yuan & Yuan, "Masked Generative Distillation", ECCV 2022 (arXiv:2205.01529), as the
    authors' classification code computes it (yzd-v/MGD cls/mmcls/distillation/losses/mgd.py).

    S = f_align(F_s): a 1x1 conv (with bias) to the teacher's channels when the widths differ, else F_s itself,
    average-pooled (or replicated) to the teacher's H x W; M_nc = 0 where u_nc < mask_ratio, else 1, with
    u_nc ~ U[0, 1) drawn per sample and channel (classification masks whole channels); G = the generator
    conv3x3 -> ReLU -> conv3x3 applied to S * M; t = the teacher's map (detached):
        L_dis = (1/N) * sum over n, c, h, w of (G(S * M) - t)^2
        loss = CE(z_s, y) + weight * L_dis.
    The mask comes from torch's global RNG on the features' device, so a seed fixes it.
    """

    argument_ranges = {"weight": "[0, inf)", "mask_ratio": "[0, 1]"}

    def __init__(self, weight: float, mask_ratio: float, feature: str, feature_shapes):
        super().__init__()
        self.weight, self.mask_ratio, self.feature = weight, mask_ratio, feature
        student_channels = feature_shapes["student"][feature][0]
        self.teacher_channels, *self.teacher_size = feature_shapes["teacher"][feature]
        self.align = (nn.Conv2d(student_channels, self.teacher_channels, 1)
                      if student_channels != self.teacher_channels else nn.Identity())
        self.generation = generation_block(self.teacher_channels)

    def scale_note(self) -> str:
        h, w = self.teacher_size
        values = self.teacher_channels * h * w
        return (f"mgd: squared error summed over the teacher's {self.teacher_channels}x{h}x{w} = {values} values per "
                f"sample, averaged over the batch; weight {self.weight:g} acts per unit of that sum "
                f"({values / 25088:.3g}x as many values as the ImageNet 512x7x7 maps the authors' weight was set for)")

    def mask(self, features: torch.Tensor) -> torch.Tensor:
        """Per sample and channel: 0 with probability mask_ratio, else 1 (the authors' torch.rand((N, C, 1, 1)))."""
        n, c = features.shape[:2]
        draw = torch.rand((n, c, 1, 1), device=features.device, dtype=features.dtype)
        return (draw >= self.mask_ratio).to(features.dtype)

    def forward(self, student, teacher, batch):
        aligned = pooled_to(self.align(student.features[self.feature]), self.teacher_size)
        generated = self.generation(aligned * self.mask(aligned))
        target = teacher.features[self.feature].detach()
        distance = (generated - target).pow(2).sum() / len(target)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * distance, {"ce": ce, "mgd": distance})
