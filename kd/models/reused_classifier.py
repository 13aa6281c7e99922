"""A student deployed with its teacher's classifier (SimKD): the network a run trains, evaluates and saves."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kd.models import INPUT, Wrapper, module_path


class _Reached(Exception):
    """Raised at the tapped module: the layers after it are not part of the computation."""

    def __init__(self, feature: torch.Tensor):
        super().__init__()
        self.feature = feature


def run_to(model: nn.Module, spec: str, images: torch.Tensor) -> torch.Tensor:
    """`model`'s feature map at tap `spec` (a module path, `:input` for what the module receives) for `images`; the
    layers after it do not run. The stopping hook is registered for this call only, so it runs after every other
    hook on that module (a feature tap's)."""
    module = model.get_submodule(module_path(spec))

    def stop(_module, inputs, output=None):
        raise _Reached(inputs[0] if spec.endswith(INPUT) else output)
    handle = module.register_forward_pre_hook(stop) if spec.endswith(INPUT) else module.register_forward_hook(stop)
    try:
        model(images)
    except _Reached as reached:
        return reached.feature
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__}'s forward never reached its feature map {spec!r}")


def projector(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """SimKD's bottleneck: 1x1 conv to out/factor channels, 3x3 conv, 1x1 conv to out; each followed by BN and ReLU."""
    hidden = out_channels // factor
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


def last_linear(module: nn.Module, path: str) -> nn.Linear:
    """The classifier at `path`: that module, or the last linear layer inside it (MobileNetV2's is a Sequential)."""
    linears = [m for m in module.get_submodule(path).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"teacher_classifier={path!r} holds no linear layer: it must name the teacher's classifier, "
                         "the module its `embed` tap reads the input of")
    return linears[-1]


class ReusedTeacherClassifier(Wrapper):
    """Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (SimKD), CVPR 2022: the student
    network up to its last feature map (tap `feature` of `backbone`), average-pooled to the teacher's map size where it
    is larger, a trainable projector to the teacher's width, global average pooling, and the teacher's classifier,
    frozen.

    Both networks' map sizes for images of `image_size` and the classifier's shape are measured when it is built: the
    student's with a blank image, the teacher's (`teacher_arch`, taps `teacher_feature` and `teacher_classifier`) on
    the meta device, without weights or cost. So a network built from the config is the trained one, before any
    weights are loaded. The classifier's weights are the teacher's, copied in by `reuse` when distillation starts and
    saved with the student from then on. The backbone's parameterised layers that do not run before the feature map
    are removed (its own classifier; MobileNetV2's last 1x1 convolution), so parameter and FLOP counts are the
    deployed network's. Taps: `feat` is the projector's output (the map the classifier pools), `embed` the
    classifier's input; every other feature is the backbone's own.
    """

    taps = {"feat": "projector", "embed": f"classifier{INPUT}"}

    def __init__(self, backbone: nn.Module, feature: str, teacher_arch: DictConfig, teacher_feature: str,
                 teacher_classifier: str, factor: int, image_size: Sequence[int]):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor={factor!r} is invalid: the projector's bottleneck divides the teacher's width by "
                             "a whole number >= 1 (SimKD: 2)")
        self.backbone, self.feature = backbone, feature
        self.teacher_classifier = module_path(teacher_classifier)
        channels, *student_size = self._remove_layers_after_feature(image_size)
        with torch.device("meta"):
            teacher = instantiate(teacher_arch)
            teacher_size = run_to(teacher.eval(), teacher_feature, torch.empty(1, 3, *image_size)).shape[2:]
        classifier = last_linear(teacher, self.teacher_classifier)
        # the authors compare the maps' heights (models/util.py SimKD.forward)
        self.source_size = tuple(teacher_size) if student_size[0] > teacher_size[0] else None
        self.projector = projector(channels, classifier.in_features, factor)
        self.classifier = nn.Linear(classifier.in_features, classifier.out_features)
        self.classifier.requires_grad_(False)

    @torch.no_grad()
    def _remove_layers_after_feature(self, image_size: Sequence[int]) -> tuple[int, ...]:
        """Replace the backbone's parameterised layers that do not run before the feature map with nothing, found by
        running a blank image; the feature map's (channels, height, width)."""
        ran: set[str] = set()
        hooks = [m.register_forward_pre_hook(lambda module, _inputs, name=name: ran.add(name))
                 for name, m in self.backbone.named_modules()]
        was_training = self.backbone.training
        device = next(self.backbone.parameters()).device
        try:
            shape = run_to(self.backbone.eval(), self.feature, torch.zeros(1, 3, *image_size, device=device)).shape
        finally:
            for hook in hooks:
                hook.remove()
            self.backbone.train(was_training)
        for name, m in list(self.backbone.named_modules()):
            if name not in ran and not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
                self.backbone.set_submodule(name, nn.Identity())
        return tuple(shape[1:])

    def reuse(self, teacher: nn.Module) -> None:
        """Copy the teacher's classifier in (frozen)."""
        self.classifier.load_state_dict(last_linear(teacher, self.teacher_classifier).state_dict())
        self.classifier.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature = run_to(self.backbone, self.feature, images)
        if self.source_size is not None:
            feature = F.adaptive_avg_pool2d(feature, self.source_size)
        return self.classifier(self.projector(feature).mean((2, 3)))
