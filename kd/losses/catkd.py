from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts
from kd.taps import INPUT, module_path


def classifier_layer(model: nn.Module, taps: Mapping[str, str], embedding: str, role: str) -> nn.Linear:
    """The linear layer a network's logits come from: the module whose input the `embedding` tap reads (every model
    config taps `embed` as `<classifier>:input`, e.g. `fc:input`), or the one nn.Linear inside it (MobileNetV2's
    `classifier` is a Sequential around it)."""
    spec = taps[embedding]
    if not spec.endswith(INPUT):
        raise ValueError(f"the {role}'s {embedding!r} taps {spec!r}, not the input of its classifier; the embedding "
                         f"tap must read `<classifier module>{INPUT}` (conf/model/*.yaml: `embed: fc{INPUT}`)")
    module = model.get_submodule(module_path(spec))
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    other = [name for name, m in module.named_modules()
             if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))]
    if len(linears) != 1 or other:
        raise ValueError(f"the {role}'s classifier {module_path(spec)!r} ({type(module).__name__}) is not one linear "
                         f"layer; applying it to a feature map needs a network whose logits are Linear(pooled map)")
    return linears[0]


class Classifiers(nn.Module):
    """Both networks' own classifiers, to apply to a feature map or to pooled regions of it.

    The teacher's weights are copied as non-persistent buffers (it is frozen: they follow the loss to its device and
    stay out of its state_dict). The student's linear layer is held by a plain reference, not registered: its
    parameters are the student's, already optimised and saved with it; registered here they would be saved twice.
    `feature` is the map the classifier pools, so its channels must be the classifier's inputs.
    """

    def __init__(self, feature: str, embedding: str, feature_shapes, student_model: nn.Module,
                 student_taps: Mapping[str, str], teacher_model: nn.Module, teacher_taps: Mapping[str, str]):
        super().__init__()
        layers = {"student": classifier_layer(student_model, student_taps, embedding, "student"),
                  "teacher": classifier_layer(teacher_model, teacher_taps, embedding, "teacher")}
        taps = {"student": student_taps, "teacher": teacher_taps}
        for role, layer in layers.items():
            channels = feature_shapes[role][feature][0]
            if channels != layer.in_features:
                raise ValueError(f"the {role}'s {feature!r} ({taps[role][feature]!r}) has {channels} channels but its "
                                 f"classifier reads {layer.in_features}: {feature!r} must be the map the classifier "
                                 f"pools (the method YAML sets it to the model's `head` where it has one, else `feat`)")
        teacher = layers["teacher"]
        self.register_buffer("teacher_weight", teacher.weight.detach().clone(), persistent=False)
        bias = None if teacher.bias is None else teacher.bias.detach().clone()
        self.register_buffer("teacher_bias", bias, persistent=False)
        object.__setattr__(self, "student_layer", layers["student"])  # bypasses nn.Module's registration

    def weights(self, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight K x C, bias K or None) of the student's or the teacher's classifier."""
        if role == "student":
            return self.student_layer.weight, self.student_layer.bias
        return self.teacher_weight, self.teacher_bias


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """CAM_k = sum_c W_kc F_c (the classifier as a bias-free 1x1 convolution), average-pooled to size x size.

    Pooled before the 1x1 convolution: both are linear, so they commute, and the classifier then runs on size x size
    cells instead of the whole map (the same values up to rounding)."""
    return torch.einsum("kc,nchw->nkhw", weight, F.adaptive_avg_pool2d(features, size))


class CATKD(DistillationLoss):
    """Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge Distillation", CVPR 2023 (arXiv:2304.12777).

    Each network's class activation maps: its own classifier's weights W (K x C, no bias) applied to the feature map
    its classifier pools, F (C x H x W), as a 1x1 convolution, CAM_k = sum_c W_kc F_c; average-pooled to r x r:
        A = AvgPool_r(W F),  with normalize: A_k <- A_k / ||A_k||_2 (each class map over its r x r cells)
        loss = ce_weight * CE(z_s, y) + weight * (1 / (K r^2)) sum_k ||A_s,k - A_t,k||^2   (averaged over the batch)
    Gradients reach the student's features and its classifier's weights; the teacher's classifier is copied, frozen.
    `features`: [the map the classifier pools, the embedding tap that names the classifier (`<module>:input`)].
    """

    argument_ranges = {"ce_weight": "[0, inf)", "weight": "[0, inf)", "resolution": "[1, inf)"}

    def __init__(self, ce_weight: float, weight: float, resolution: int, normalize: bool, features: list[str],
                 feature_shapes, student_model: nn.Module, student_taps: Mapping[str, str], teacher_model: nn.Module,
                 teacher_taps: Mapping[str, str]):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise ValueError(f"cat_kd: resolution {resolution!r} is not a whole number of cells (e.g. 2)")
        if len(features) != 2:
            raise ValueError(f"cat_kd: features {list(features)} must be [the map the classifier pools, the embedding]")
        self.ce_weight, self.weight, self.resolution, self.normalize = ce_weight, weight, resolution, normalize
        self.feature, embedding = features
        self.classifiers = Classifiers(self.feature, embedding, feature_shapes, student_model, student_taps,
                                       teacher_model, teacher_taps)

    def scale_note(self) -> str:
        classes, r = len(self.classifiers.teacher_weight), self.resolution
        maps = "each L2-normalised" if self.normalize else "unnormalised: classifier weights times features"
        return (f"cat_kd: {classes} class maps of {r}x{r} per sample ({maps}); the squared difference is averaged over "
                f"the {classes * r * r} values, weight {self.weight:g}")

    def maps(self, features: torch.Tensor, role: str) -> torch.Tensor:
        cams = class_activation_maps(features, self.classifiers.weights(role)[0], self.resolution)
        return F.normalize(cams, dim=(2, 3)) if self.normalize else cams

    def forward(self, student, teacher, batch):
        cam_s = self.maps(student.features[self.feature], "student")
        cam_t = self.maps(teacher.features[self.feature].detach(), "teacher")
        cat = F.mse_loss(cam_s, cam_t)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(self.ce_weight * ce, self.weight * cat, {"ce": ce, "cat": cat})
