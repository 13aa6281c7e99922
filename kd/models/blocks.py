"""The residual block shared by the CIFAR ResNets; they differ only in their downsampling shortcut."""
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; `shortcut` is used when the shape changes.

    The output ReLU is a module of its own, so the block's pre-activation (its input) can be tapped by name.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut if stride != 1 or in_planes != planes else nn.Sequential()
        self.relu = nn.ReLU()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))
