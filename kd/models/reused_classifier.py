"""A student deployed with its teacher's classifier (SimKD): the network a run trains, evaluates and saves."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kd.models import Wrapper

INPUT = ":input"
PROBE_SIZE = (32, 32)  # the blank image that finds the layers after the feature map; any size they all accept


class _Reached(Exception):
    """Raised by the hook on the last feature map: the backbone's remaining layers are not part of this network."""

    def __init__(self, feature: torch.Tensor):
        super().__init__()
        self.feature = feature


def projector(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """SimKD's bottleneck: 1x1 conv to out/factor channels, 3x3 conv, 1x1 conv to out; each followed by BN and ReLU."""
    hidden = out_channels // factor
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class ReusedTeacherClassifier(Wrapper):
    """Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (SimKD), CVPR 2022: the student
    network up to its last feature map (`feature`, a module path of `backbone`), average-pooled to the teacher's map
    size where it is larger, a trainable projector to the teacher's width, global average pooling, and the teacher's
    classifier, frozen.

    The classifier's shape is read from `teacher_arch` (built on the meta device: no weights, no cost) at the module
    path `teacher_classifier`; its weights are the teacher's, copied in by `reuse` when distillation starts and saved
    with the student from then on. The backbone's layers after `feature` never run and its parameterised ones are
    removed (its own classifier; MobileNetV2's last 1x1 convolution), so parameter and FLOP counts are the deployed
    network's. Feature taps keep their meaning: `feat` is the projector's output (the map the classifier pools),
    `embed` the classifier's input; every other tap is the backbone's own.
    """

    taps = {"feat": "projector", "embed": f"classifier{INPUT}"}

    def __init__(self, backbone: nn.Module, feature: str, teacher_arch: DictConfig, teacher_classifier: str,
                 factor: int):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor={factor!r} is invalid: the projector's bottleneck divides the teacher's width by "
                             "a whole number >= 1 (SimKD: 2)")
        self.backbone, self.feature = backbone, feature.removesuffix(INPUT)
        self.teacher_classifier = teacher_classifier.removesuffix(INPUT)
        self.feature_input = feature.endswith(INPUT)
        channels = self._remove_layers_after_feature()
        with torch.device("meta"):
            classifier = instantiate(teacher_arch).get_submodule(self.teacher_classifier)
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"teacher_classifier={teacher_classifier!r} names a {type(classifier).__name__}, not the "
                             "teacher's linear classifier (the module its `embed` tap reads the input of)")
        self.projector = projector(channels, classifier.in_features, factor)
        self.classifier = nn.Linear(classifier.in_features, classifier.out_features)
        self.classifier.requires_grad_(False)
        self.source_size: tuple[int, int] | None = None

    def _stop_at_feature(self):
        module = self.backbone.get_submodule(self.feature)

        def stop(_module, inputs, output=None):
            raise _Reached(inputs[0] if self.feature_input else output)
        # registered at each call, so it runs after every other hook on the module (a feature tap's)
        if self.feature_input:
            return module.register_forward_pre_hook(stop)
        return module.register_forward_hook(stop)

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        handle = self._stop_at_feature()
        try:
            self.backbone(images)
        except _Reached as reached:
            return reached.feature
        finally:
            handle.remove()
        raise RuntimeError(f"the backbone's forward never reached its feature map {self.feature!r}")

    @torch.no_grad()
    def _remove_layers_after_feature(self) -> int:
        """Replace the backbone's parameterised layers that run after the feature map with nothing, found by running
        a blank image; the feature map's channels."""
        ran: set[str] = set()
        hooks = [m.register_forward_pre_hook(lambda module, _inputs, name=name: ran.add(name))
                 for name, m in self.backbone.named_modules()]
        was_training = self.backbone.training
        self.backbone.eval()
        device = next(self.backbone.parameters()).device
        try:
            channels = self._feature_map(torch.zeros(1, 3, *PROBE_SIZE, device=device)).shape[1]
        finally:
            for hook in hooks:
                hook.remove()
            self.backbone.train(was_training)
        unused = [name for name, m in self.backbone.named_modules()
                  if name not in ran and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
        for name in unused:
            self.backbone.set_submodule(name, nn.Identity())
        return channels

    def reuse(self, teacher: nn.Module) -> None:
        """Copy the teacher's classifier in (frozen)."""
        self.classifier.load_state_dict(teacher.get_submodule(self.teacher_classifier).state_dict())
        self.classifier.requires_grad_(False)

    def align_to(self, size: tuple[int, int] | None) -> None:
        """Average-pool the student's map to `size` (height, width) before the projector: the teacher's map size, where
        the student's is larger (SimKD's spatial alignment, part of the deployed network); None: never."""
        self.source_size = None if size is None else (int(size[0]), int(size[1]))

    def get_extra_state(self):
        return {"source_size": self.source_size}

    def set_extra_state(self, state) -> None:
        self.align_to(state["source_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature = self._feature_map(images)
        if self.source_size is not None:
            feature = F.adaptive_avg_pool2d(feature, self.source_size)
        projected = self.projector(feature)
        return self.classifier(projected.mean((2, 3)))
