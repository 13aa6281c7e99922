import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import BatchNorm2d, DistillationLoss, LossParts
from kd.losses.schedule import ramp


class ABF(nn.Module):
    """Attention-based fusion: the student level to `mid` channels (1x1 conv + BN), fused with the residual from
    the deeper level (nearest-upsampled) by two sigmoid attention maps from a 1x1 conv over both, resized to the
    teacher's size, then to the teacher's channels (3x3 conv + BN). Returns (output, next residual)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x, residual, out_size: tuple[int, int]):
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.attention(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE at full resolution (weight 1) and after average-pooling to 4x4, 2x2, 1x1 (only those smaller than the
    map; each used level half the previous one's weight), divided by the sum of the weights."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A pooled vector (B, C) as a (B, C, 1, 1) map; maps unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


class ReviewKD(DistillationLoss):
    """Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (arXiv:2104.09044), as the
    authors' CIFAR-100 code (dvlab-research/ReviewKD) computes it.

    Levels i = 1..L, shallow to deep (student stages after ReLU and its pooled embedding as a 1x1 map; teacher
    stages before ReLU and its embedding). From the deepest level up, ABF_i fuses the student's level i with the
    residual R_{i+1} from the level below: (O_i, R_i) = ABF_i(F_s,i, R_{i+1}), O_L, R_L = ABF_L(F_s,L). Then
        HCL(O, T) = [MSE(O, T) + sum_k w_k MSE(pool_k(O), pool_k(T))] / (1 + sum_k w_k),
            k over 4x4, 2x2, 1x1 smaller than the map, w = 1/2, 1/4, 1/8 for the levels used,
        loss = CE(z_s, y) + weight * min(1, t / (warmup_fraction * epochs)) * sum_i HCL(O_i, F_t,i),
    t = epochs done, counted per step.
    """

    argument_ranges = {"weight": "[0, inf)", "warmup_fraction": "[0, 1]", "max_mid_channels": "[1, inf)"}

    def __init__(self, weight: float, warmup_fraction: float, max_mid_channels: int, features: list[str],
                 teacher_features: list[str], feature_shapes):
        super().__init__()
        self.weight, self.warmup_fraction = weight, warmup_fraction
        self.features, self.teacher_features = list(features), list(teacher_features)
        if len(self.features) != len(self.teacher_features) or not self.features:
            raise ValueError(f"reviewkd: features {self.features} and teacher_features {self.teacher_features} "
                             f"must pair level by level: give lists of the same length")
        student = [self._shape(feature_shapes, "student", name) for name in self.features]
        teacher = [self._shape(feature_shapes, "teacher", name) for name in self.teacher_features]
        mid = min(max_mid_channels, student[-1][0])
        last = len(student) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < last) for i, (s, t) in enumerate(zip(student, teacher)))
        self.out_sizes = [tuple(t[1:]) for t in teacher]

    @staticmethod
    def _shape(feature_shapes, role: str, name: str) -> tuple[int, int, int]:
        shapes = feature_shapes[role]
        if name not in shapes:
            raise ValueError(f"reviewkd: the {role} has no tapped feature {name!r} (tapped: {list(shapes)}); "
                             f"method.taps must list every name in features and teacher_features")
        shape = tuple(shapes[name])
        return shape + (1, 1) if len(shape) == 1 else shape

    def forward(self, student, teacher, batch):
        levels = [as_map(student.features[name]) for name in self.features]
        out, residual = self.abfs[-1](levels[-1], None, self.out_sizes[-1])
        outs = [out]
        for i in range(len(levels) - 2, -1, -1):
            out, residual = self.abfs[i](levels[i], residual, self.out_sizes[i])
            outs.insert(0, out)
        targets = [as_map(teacher.features[name].detach()) for name in self.teacher_features]
        hcl = sum(hierarchical_context_loss(o, t) for o, t in zip(outs, targets))
        ce = F.cross_entropy(student.logits, batch.labels)
        weight = self.weight * ramp(batch.progress, fraction=self.warmup_fraction)
        return LossParts(ce, weight * hcl, {"ce": ce, "hcl": hcl})
