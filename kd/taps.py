"""Named feature taps: forward hooks on configured modules, no per-method model subclasses.

Each model config maps feature names to module paths (`conf/model/<name>.yaml`, `taps:`). Every architecture
uses the same names: `stage1`..`stageN` (end of each stage, after its activation), `stageK_preact` (the same
point before the stage's last ReLU), `feat` (the last feature map) and `embed` (the pooled vector the
classifier reads). `stage-1`, `stage-2`, ... count from the last stage, so a method can ask for "the last
three stages" of any pair of networks. A path ending in `:input` taps what that module receives instead of
what it returns (the input of a ReLU is a pre-activation; the input of the classifier is the embedding).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from kd.models import CIFAR_IMAGE_SIZE, INPUT, Wrapper, module_path

_STAGE = re.compile(r"stage(-?\d+)(_preact)?")


@dataclass
class Outputs:
    """What a network hands to a loss: its logits and the named features the method asked for."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached_float(self) -> "Outputs":
        """fp32 copies outside autograd (teacher outputs made under inference_mode become normal tensors)."""
        return Outputs(self.logits.float().clone(), {k: v.float().clone() for k, v in self.features.items()})

    def float(self) -> "Outputs":
        return Outputs(self.logits.float(), {k: v.float() for k, v in self.features.items()})


def resolve(name: str, taps: Mapping[str, str], model_name: str) -> str:
    """The tap spec (module path, maybe `:input`) that feature `name` means for a model with these `taps`."""
    stage = _STAGE.fullmatch(name)
    if stage and int(stage[1]) < 0:
        count = sum(1 for key in taps if re.fullmatch(r"stage\d+", key))
        index = count + 1 + int(stage[1])
        if index < 1:
            raise ValueError(f"feature {name!r}: model {model_name!r} has only {count} stages (stage1..stage{count})")
        name = f"stage{index}{stage[2] or ''}"
    if name not in taps:
        raise ValueError(f"model {model_name!r} defines no feature tap {name!r}; it has {list(taps)}")
    return taps[name]


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights are (its first parameter or buffer; the CPU for a model with neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class TappedModel(nn.Module):
    """Normalises [0, 1] images with the model's own mean/std, runs it, and captures the tapped features.

    `taps` maps a feature name (as losses use it, e.g. "feat") to a tap spec (e.g. "layer3" or
    "linear:input"). One hook per tapped module, however many names point at it; `close()` removes them.
    """

    def __init__(self, model: nn.Module, mean, std, taps: Mapping[str, str] | None = None):
        super().__init__()
        self.model = model
        device = model_device(model)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, -1, 1, 1), persistent=False)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = []
        self.taps = dict(taps or {})
        modules = dict(model.named_modules())
        names_by_spec: dict[str, list[str]] = {}
        for name, spec in self.taps.items():
            names_by_spec.setdefault(spec, []).append(name)
        for spec, names in names_by_spec.items():
            path = module_path(spec)
            if path not in modules:
                choices = ", ".join(n for n in modules if n and "." not in n)
                raise ValueError(f"feature tap {names[0]!r}: {type(model).__name__} has no module {path!r}; "
                                 f"top-level modules are: {choices}")
            if spec.endswith(INPUT):
                hook = modules[path].register_forward_pre_hook(self._capture_input(names))
            else:
                hook = modules[path].register_forward_hook(self._capture_output(names))
            self._handles.append(hook)

    @property
    def tap_paths(self) -> set[str]:
        """The module paths hooked (BatchNorm folding leaves these modules alone)."""
        return {module_path(spec) for spec in self.taps.values()}

    def _capture_output(self, names: list[str]):
        def capture(_module, _inputs, output):
            for name in names:
                self._captured[name] = output
        return capture

    def _capture_input(self, names: list[str]):
        def capture(_module, inputs):
            for name in names:
                self._captured[name] = inputs[0]
        return capture

    def forward(self, images: torch.Tensor) -> Outputs:
        self._captured = {}
        logits = self.model((images - self.mean) / self.std)
        features, self._captured = self._captured, {}
        return Outputs(logits, features)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def wrapped_spec(model: nn.Module, name: str, spec: str) -> str:
    """Where feature `name` (at `spec` in the network's own config) is in `model`: a wrapper around the network
    (kd.models.Wrapper) names the features it defines itself in its `taps` and finds the rest in its `backbone`."""
    if not isinstance(model, Wrapper):
        return spec
    return model.taps.get(name, f"backbone.{spec}")


def tapped(model_cfg: DictConfig, model: nn.Module, names: list[str], normalize: bool = True) -> TappedModel:
    """Wrap a model with its own input normalisation (unless the caller normalises) and the taps a method
    asks for, by feature name."""
    taps = {name: wrapped_spec(model, name, resolve(name, model_cfg.taps, model_cfg.name)) for name in names}
    norm = model_cfg.normalization
    mean, std = (list(norm.mean), list(norm.std)) if normalize else ([0.0] * 3, [1.0] * 3)
    return TappedModel(model, mean, std, taps)


def height_width(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from a square's side or from a (height, width) pair such as `images.shape[-2:]`."""
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"image_size={tuple(image_size)!r} is invalid: give (height, width), e.g. images.shape[-2:], "
                         "or one side for square images")
    return int(image_size[0]), int(image_size[1])


@torch.no_grad()
def probe_shapes(net: TappedModel, device: torch.device,
                 image_size: int | Sequence[int] = CIFAR_IMAGE_SIZE) -> dict[str, tuple[int, ...]]:
    """One forward of two blank images of the data's `image_size` (e.g. `train_x.shape[-2:]`): the per-sample shape
    of every tapped feature, as training will see it."""
    was_training = net.training
    net.eval()
    blank = torch.zeros(2, 3, *height_width(image_size), device=device)
    shapes = {k: tuple(v.shape[1:]) for k, v in net(blank).features.items()}
    net.train(was_training)
    return shapes
