"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) with option-A shortcuts.

Module names match the public pytorch_resnet_cifar10 checkpoints (conv1, bn1, layer1-3, linear), so their
state dicts load once the DataParallel `module.` prefix is stripped (see kd.checkpoints).
"""
import torch.nn.functional as F
from torch import nn

from kd.models.blocks import BasicBlock


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad planes/4 channels on BOTH sides of the channel axis.

    Padding one side only loads without error but predicts garbage with the public weights.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarResNet(nn.Module):
    """`layer3` outputs the last feature map (64x8x8 for 32x32 inputs)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes if j == 0 else planes, planes, stride if j == 0 else 1, PadShortcut(planes))
                      for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)
