"""The original notebook's student: a 141,354-parameter plain CNN."""
from torch import nn


def _stage(widths: list[int]) -> nn.Sequential:
    """(conv3x3-BN-ReLU) per width, then 2x2 max-pool before the last ReLU.

    Max-pooling commutes with ReLU, so this is the notebook's conv-BN-ReLU-...-pool exactly (same outputs, same
    state-dict keys), and the input of the last ReLU is the stage's pre-activation, tappable by name.
    """
    layers: list[nn.Module] = []
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers[:-1], nn.MaxPool2d(2), nn.ReLU())


class SmallNet(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-pool (each conv with BN+ReLU), GAP, linear.

    `stage1..3` end at 32x16x16, 64x8x8 and 128x4x4 for 32x32 inputs.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stage1 = _stage([3, 32, 32])
        self.stage2 = _stage([32, 64, 64])
        self.stage3 = _stage([64, 128])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))
