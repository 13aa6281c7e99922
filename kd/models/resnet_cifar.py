"""CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of n BasicBlocks.

Two shortcut forms where a block changes shape:
- `pad` (option A, the paper's): subsample and zero-pad, no parameters. Module names match the public
  pytorch_resnet_cifar10 checkpoints (conv1, bn1, layer1-3, linear), so their state dicts load once the
  DataParallel `module.` prefix is stripped (see kd.checkpoints).
- `projection`: 1x1 conv + BatchNorm, as the KD benchmark (RepDistiller's models/resnet.py, which mdistiller
  copies) builds them; its resnet8x4/resnet32x4 are four times wider (32/64/128/256) and also project in
  layer1's first block (32 -> 64 channels at stride 1).

The stem is CIFAR's (3x3 conv at stride 1, no max-pool) unless `stem_stride=2` and/or `stem_pool=True` shrink
larger images first (96x96 STL-10, 64x64 Tiny-ImageNet): neither adds a parameter, so a checkpoint loads either way.
"""
import torch.nn.functional as F
from torch import nn

from kd.models.blocks import BasicBlock

NARROW = (16, 16, 32, 64)   # stem, layer1, layer2, layer3
WIDE = (32, 64, 128, 256)   # RepDistiller's "x4" models
SHORTCUTS = ("pad", "projection")
STEM_STRIDES = (1, 2)


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad planes/4 channels on BOTH sides of the channel axis.

    Padding one side only loads without error but predicts garbage with the public weights.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


def _shortcut(kind: str, in_planes: int, planes: int, stride: int) -> nn.Module:
    if kind == "pad":
        return PadShortcut(planes)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


def stem_pooling(stem_pool: bool) -> nn.Module:
    """The ImageNet ResNets' 3x3 stride-2 max-pool after the stem, or nothing."""
    if stem_pool not in (True, False):
        raise ValueError(f"stem_pool={stem_pool!r} is invalid: it must be true or false")
    return nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()


class CifarResNet(nn.Module):
    """`layer3` outputs the last feature map (64x8x8 for 32x32 inputs, 256x8x8 for the wide form), a quarter of the
    input's side; `stem_stride=2` and `stem_pool=True` each halve it once more."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "pad", widths=NARROW, *,
                 stem_stride: int = 1, stem_pool: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is invalid: it must be one of {SHORTCUTS}")
        stem, *planes_per_stage = widths
        if shortcut == "pad" and stem != planes_per_stage[0]:
            raise ValueError(f"shortcut='pad' needs layer1 as wide as the stem ({stem} vs {planes_per_stage[0]} "
                             "channels): option A only pads when it also subsamples; use 'projection'")
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride={stem_stride!r} is invalid: it must be one of {STEM_STRIDES}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, stem, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = stem_pooling(stem_pool)
        in_planes = stem
        for i, (planes, stride) in enumerate(zip(planes_per_stage, (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_planes, planes, stride, _shortcut(shortcut, in_planes, planes, stride))]
            blocks += [BasicBlock(planes, planes, 1, nn.Sequential()) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet8(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(8, num_classes, shortcut, **stem)


def resnet14(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(14, num_classes, shortcut, **stem)


def resnet20(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(20, num_classes, shortcut, **stem)


def resnet32(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(32, num_classes, shortcut, **stem)


def resnet44(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(44, num_classes, shortcut, **stem)


def resnet56(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(56, num_classes, shortcut, **stem)


def resnet110(num_classes: int = 10, shortcut: str = "pad", **stem) -> CifarResNet:
    return CifarResNet(110, num_classes, shortcut, **stem)


def resnet8x4(num_classes: int = 10, shortcut: str = "projection", **stem) -> CifarResNet:
    return CifarResNet(8, num_classes, shortcut, WIDE, **stem)


def resnet32x4(num_classes: int = 10, shortcut: str = "projection", **stem) -> CifarResNet:
    return CifarResNet(32, num_classes, shortcut, WIDE, **stem)
