"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015), in the KD benchmark's form.

As RepDistiller's models/vgg.py (copied by mdistiller) builds its `vggN_bn`: five blocks of conv3x3 (with bias)
-BN-ReLU, 2x2 max-pooling after the first three blocks, the last two blocks both at 4x4 for 32x32 inputs, then
global average pooling and one `Linear(512, classes)` (the FC stack removed). Module names are the reference's
(`block0..4`, `pool0..2`, `pool4`, `classifier`), so its state dicts load as they are. Each block ends in its own
ReLU module (the reference applies it in `forward`), appended after the BatchNorm: no parameters, so the
state-dict keys are unchanged, and the block's pre-activation is that ReLU's input.

The reference also pools after block3 when the input is 64x64 (Tiny-ImageNet); this form is for 32x32 only.
"""
import math

from torch import nn

CONFIGS = {  # channels of each conv, per block
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, config: list[list[int]], num_classes: int = 10):
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", _block(in_channels, widths))
            in_channels = widths[-1]
        for i in range(3):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.pool4(x).flatten(1))


def vgg8(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg19"], num_classes)
