"""Plain nn.Modules: the teachers and students. Feature taps are configured in YAML, not in code."""
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kd.models.resnet18 import ResNet18
from kd.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56
from kd.models.smallnet import SmallNet

# The (height, width) the CIFAR architectures were designed for. Every consumer reads the size from the images it is
# given; this is only the size taken where none is known: a caller that passes none, and a run recorded before
# results.json kept `data.image_size`.
CIFAR_IMAGE_SIZE = (32, 32)


class Wrapper(nn.Module):
    """A module built around a network (its `backbone`) by a model config's `wrapper`: the network a run trains,
    evaluates and saves. `taps`: the feature names it defines itself (feature name -> tap spec in the wrapper); every
    other feature is the backbone's, at its configured place."""

    taps: dict[str, str] = {}
    backbone: nn.Module


def build(model_cfg: DictConfig) -> nn.Module:
    """A model config's network: its `arch`, inside its `wrapper` when it has one (a student deployed with its
    teacher's classifier: kd/models/reused_classifier.py). Every place that builds a student builds it here, so the
    run, the report and kd.evaluate agree on what the network is."""
    network = instantiate(model_cfg.arch)
    wrapper = model_cfg.get("wrapper")
    return network if wrapper is None else instantiate(wrapper, network)


__all__ = ["build", "Wrapper", "CIFAR_IMAGE_SIZE", "ResNet18", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56",
           "SmallNet"]
