"""ResNet-50 for CIFAR (He et al. 2016, bottleneck blocks) as the KD benchmark uses it (the resnet50 teacher of
the resnet50 -> mobilenetv2 pair).

As RepDistiller's models/resnetv2.py builds `ResNet50` (despite the file's name, post-activation, not the
pre-activation "v2"): a 3x3 stem conv-BN-ReLU at full resolution with no max-pool, stages of 3/4/6/3 bottlenecks
(256/512/1024/2048 channels, strides 1/2/2/2, the stride on the 3x3 conv), a 1x1 conv + BN projection wherever a
block changes shape, global average pooling and the classifier. Module names are the reference's (`conv1`,
`bn1`, `layer1..4.<i>.{conv1..3,bn1..3,shortcut}`, `linear`), so its state dicts load as they are.
"""
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3 (stride s)-BN-ReLU, 1x1-BN to 4x the width, plus shortcut, then ReLU.

    The output ReLU is a module of its own, so the block's pre-activation (its input) can be tapped by name.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """`layer4` outputs the last feature map (2048x4x4 for 32x32 inputs)."""

    def __init__(self, num_blocks, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            blocks = [Bottleneck(in_planes if j == 0 else planes * 4, planes, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes * Bottleneck.expansion
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # the reference's initialisation (zero_init_residual off)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet50(num_classes: int = 10) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), num_classes)
