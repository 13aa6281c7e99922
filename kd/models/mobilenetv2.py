"""MobileNetV2 (Sandler et al., CVPR 2018) as the KD benchmark uses it on CIFAR: RepDistiller's `mobile_half`.

RepDistiller's models/mobilenetv2.py (from Route Constrained Optimization; mdistiller copies it) keeps the
ImageNet layout, stride-2 stem included, with expansion 6 and width multiplier 0.5: a 32x32 image is 16x16 after
the stem and 2x2 at the end. Differences from the paper that the benchmark has and this keeps: the first block
(expansion 1) still has its 1x1 expansion conv, ReLU instead of ReLU6, the head conv stays 1280 wide. Module
names are the reference's (`conv1`, `blocks.<group>.<i>.conv.<0..7>`, `conv2`, `classifier.0`), so its state
dicts load as they are.

Each block ends in a linear bottleneck (1x1 conv + BN, no activation), so a stage's output has no ReLU after it.
"""
import math

from torch import nn

# (channels before width scaling, blocks, stride of the first block): the paper's table 2; the first group
# expands by 1, the others by `expansion`
GROUPS = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
LAST_CHANNELS = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); identity added at stride 1, same width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, expansion: int = 6, width_mult: float = 0.5):
        super().__init__()
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for g, (channels, n, stride) in enumerate(GROUPS):
            out_channels = int(channels * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(in_channels, out_channels, stride if i == 0 else 1,
                                              1 if g == 0 else expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        last = int(LAST_CHANNELS * width_mult) if width_mult > 1.0 else LAST_CHANNELS
        self.conv2 = _conv_bn_relu(in_channels, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))
