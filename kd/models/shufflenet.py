"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) in the KD benchmark's CIFAR forms.

As RepDistiller's models/ShuffleNetv1.py and ShuffleNetv2.py (copied by mdistiller) build `ShuffleV1` and
`ShuffleV2`: the ImageNet stem (3x3/s2 conv + max-pool) becomes a 1x1 conv-BN-ReLU to 24 channels at full
resolution, so the three stages run at 16x16, 8x8 and 4x4 for 32x32 inputs. Module names are the reference's, so
its state dicts load as they are; the only added modules are parameter-free ReLUs where a feature tap needs one.
"""
import torch
import torch.nn.functional as F
from torch import nn


class ChannelShuffle(nn.Module):
    """(N, g*c, H, W) -> (N, c*g, H, W): channel i of group j moves to position i*g + j."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Unit(nn.Module):
    """1x1 group conv-BN-ReLU, shuffle, 3x3 depthwise (stride s)-BN-ReLU, 1x1 group conv-BN; merged with the
    shortcut (stride 2: 3x3 average pool, concatenated; stride 1: identity, added), then ReLU.

    As in the reference and unlike the paper, the depthwise conv is followed by a ReLU, and the first unit (on the
    24-channel stem) uses one group in its first conv.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.concat = stride == 2
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if self.concat else nn.Sequential()
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.concat else out + res)


class ShuffleNetV1(nn.Module):
    """Stages of 1 stride-2 unit (whose branch adds out - in channels to the pooled input) + stride-1 units."""

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            units = [ShuffleV1Unit(in_planes, planes - in_planes, 2, groups)]
            units += [ShuffleV1Unit(planes, planes, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            in_planes = planes
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ShuffleV2Unit(nn.Module):
    """Split the channels in halves; the second goes through 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; concatenate
    with the untouched first half and shuffle.

    The last ReLU is applied after the concatenation and the shuffle rather than on the branch: the same output
    (the untouched half is already non-negative, being the previous unit's output, and a permutation commutes
    with ReLU), and one pre-activation tensor, in the output's channel order, as the ReLU's input.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.conv1 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.half)
        self.conv2 = nn.Conv2d(self.half, self.half, 3, 1, 1, groups=self.half, bias=False)
        self.bn2 = nn.BatchNorm2d(self.half)
        self.conv3 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.half)
        self.shuffle = ChannelShuffle(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        x1, x2 = x[:, :self.half], x[:, self.half:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        return self.relu(self.shuffle(torch.cat([x1, self.bn3(self.conv3(out))], 1)))


class ShuffleV2DownUnit(nn.Module):
    """Both halves see the whole input at stride 2: left 3x3 depthwise/s2-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU,
    3x3 depthwise/s2-BN, 1x1-BN-ReLU; concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """Stages of one down-sampling unit + `num_blocks` units; a 1x1 conv-BN-ReLU head before the pooling."""

    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int = 10):
        super().__init__()
        *stage_channels, head_channels = out_channels
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (channels, n) in enumerate(zip(stage_channels, num_blocks), start=1):
            units = [ShuffleV2DownUnit(in_channels, channels)] + [ShuffleV2Unit(channels) for _ in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, head_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.relu2 = nn.ReLU()
        self.linear = nn.Linear(head_channels, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def shufflenetv1(num_classes: int = 10) -> ShuffleNetV1:
    """The benchmark's ShuffleV1: g = 3, 1x width (240/480/960 channels, 4/8/4 units)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


def shufflenetv2(num_classes: int = 10) -> ShuffleNetV2:
    """The benchmark's ShuffleV2: 1x width (116/232/464 channels, 4/8/4 units, a 1024-wide head)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
