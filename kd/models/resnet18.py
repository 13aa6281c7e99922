"""CIFAR ResNet-18: 3x3 stem, no max-pool (11,173,962 parameters for 10 classes); `stem="imagenet"` gives it
torchvision's ImageNet stem instead (7x7 stride-2 conv + 3x3 stride-2 max-pool, 11,181,642 parameters), for
larger images."""
import torch.nn.functional as F
from torch import nn

from kd.models.blocks import BasicBlock

STEMS = ("cifar", "imagenet")


def block(in_planes: int, planes: int, stride: int) -> BasicBlock:
    projection = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(in_planes, planes, stride, projection)


def stem_layers(stem: str) -> tuple[nn.Conv2d, nn.Module]:
    """The stem's convolution and what follows its ReLU: CIFAR's keeps the resolution, ImageNet's divides it by 4."""
    if stem == "cifar":
        return nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    if stem == "imagenet":
        return nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
    raise ValueError(f"stem={stem!r} is invalid: it must be one of {STEMS}")


class ResNet18(nn.Module):
    """`layer4` outputs the last feature map (512x4x4 for 32x32 inputs: an eighth of the input's side with the
    CIFAR stem, a 32nd with the ImageNet stem)."""

    def __init__(self, num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        conv, after_relu = stem_layers(stem)
        self.conv1, self.bn1, self.maxpool = conv, nn.BatchNorm2d(64), after_relu
        widths, strides, in_planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for i, (planes, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [block(in_planes, planes, stride), block(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
