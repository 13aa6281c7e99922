"""CIFAR ResNet-18: 3x3 stem, no max-pool (11,173,962 parameters for 10 classes)."""
import torch.nn.functional as F
from torch import nn

from kd.models.blocks import BasicBlock


def block(in_planes: int, planes: int, stride: int) -> BasicBlock:
    projection = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(in_planes, planes, stride, projection)


class ResNet18(nn.Module):
    """`layer4` outputs the last feature map (512x4x4 for 32x32 inputs)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides, in_planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for i, (planes, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [block(in_planes, planes, stride), block(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
