"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, Wide Residual Networks, BMVC 2016), WRN-d-k.

Depth d = 6n+4: a 3x3 stem conv, three stages of n pre-activation blocks (16k, 32k, 64k channels, strides
1/2/2), then BN-ReLU, global average pooling and the classifier. Built as the KD benchmark builds them
(RepDistiller's models/wrn.py, copied by mdistiller), with its module names, so its state dicts load as they
are: `conv1`, `block1..3.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}`, the final `bn1`, `fc`. No dropout (the
benchmark's drop rate is 0).

Pre-activation means a stage ends in a raw residual sum; its activated form is that sum through the next BN-ReLU
(the next stage's first `bn1`/`relu1`, or the final `bn1`/`relu`), which the feature taps read.
"""
import math

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    Same width: the shortcut is the raw input. A change of width: the shortcut is a 1x1 conv (no BN) applied to the
    block's activated input ReLU(BN(x)), not to x, as in Zagoruyko's code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    """One stage; a wrapper only so that module names (`block1.layer.0...`) match the reference's."""

    def __init__(self, n: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn_16_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 2, num_classes)
