"""Plain nn.Modules: the teachers and students. Feature taps are configured in YAML, not in code."""
from kd.models.resnet18 import ResNet18
from kd.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from kd.models.smallnet import SmallNet

# The (height, width) the CIFAR architectures were designed for. Every consumer reads the size from the images it is
# given; this is only the size taken where none is known: a caller that passes none, and a run recorded before
# results.json kept `data.image_size`.
CIFAR_IMAGE_SIZE = (32, 32)

__all__ = ["CIFAR_IMAGE_SIZE", "ResNet18", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "SmallNet"]
