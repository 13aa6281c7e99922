"""Plain nn.Modules: the teachers and students. Feature taps are configured in YAML, not in code."""
from collections.abc import Sequence

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

INPUT = ":input"
"""A tap spec ending in this names what a module receives (`linear:input`: the embedding), not what it returns."""


def module_path(spec: str) -> str:
    """The module a tap spec hooks (`layer3.2.relu:input` -> `layer3.2.relu`)."""
    return spec.removesuffix(INPUT)


class Wrapper(nn.Module):
    """A module built around a network (its `backbone`) by a model config's `wrapper`: the network a run trains,
    evaluates and saves. `taps`: the feature names it defines itself (feature name -> tap spec in the wrapper); every
    other feature is the backbone's, at its configured place."""

    taps: dict[str, str] = {}
    backbone: nn.Module


def build(model_cfg: DictConfig, image_size: Sequence[int] = CIFAR_IMAGE_SIZE) -> nn.Module:
    """A model config's network: its `arch`, inside its `wrapper` when it has one (a student deployed with its
    teacher's classifier: kd/models/reused_classifier.py), built for images of `image_size` (height, width; a wrapper
    may depend on it). The run, the report and kd.evaluate build students here, so they agree on the network."""
    network = instantiate(model_cfg.arch)
    wrapper = model_cfg.get("wrapper")
    return network if wrapper is None else instantiate(wrapper, network, image_size=tuple(image_size))


__all__ = ["build", "module_path", "Wrapper", "CIFAR_IMAGE_SIZE", "INPUT", "ResNet18", "CifarResNet", "resnet20",
           "resnet32", "resnet44", "resnet56", "SmallNet"]
