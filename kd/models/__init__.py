"""Plain nn.Modules: the teachers and students. Feature taps are configured in YAML, not in code."""
from kd.models.resnet18 import ResNet18
from kd.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from kd.models.smallnet import SmallNet

__all__ = ["ResNet18", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "SmallNet"]
