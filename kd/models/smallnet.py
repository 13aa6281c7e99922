"""The original notebook's student: a 141,354-parameter plain CNN."""
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallNet(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-pool (each conv with BN+ReLU), GAP, linear.

    `stage3` outputs the last feature map (128x4x4 for 32x32 inputs).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stage1 = nn.Sequential(*_conv_bn_relu(3, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_conv_bn_relu(64, 128), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))
