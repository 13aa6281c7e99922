import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts, pooled_to


def channel_maps(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(b, C, H*W): each channel's spatial map, average-pooled to `size` if larger, as a unit vector."""
    return F.normalize(pooled_to(features, size).flatten(2), dim=2)


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over images and channel pairs of k(a_i, b_j) = (a_i . b_j)^2 (polynomial kernel, d = 2, c = 0)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


class NeuronSelectivityTransfer(DistillationLoss):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv:1707.01219, 2017.

    For each stage pair, both maps are average-pooled to their common (smaller) spatial size; every channel's
    spatial map, L2-normalised, is one sample of that network's distribution of neuron selectivities, and
    MMD^2 = mean k(s, s') + mean k(t, t') - 2 mean k(s, t) with k(x, y) = (x . y)^2, per image, averaged over
    the batch. loss = CE(z_s, y) + weight * sum over the stage pairs of MMD^2.
    """

    argument_ranges = {"weight": "[0, inf)"}

    def __init__(self, weight: float, features: list, feature_shapes):
        super().__init__()
        self.weight, self.features = weight, list(features)
        self.sizes = []
        for name in self.features:
            student, teacher = feature_shapes["student"][name], feature_shapes["teacher"][name]
            if len(student) != 3 or len(teacher) != 3:
                raise ValueError(f"nst: feature {name!r} must be a C x H x W map in both networks (student "
                                 f"{student}, teacher {teacher}); use stage taps such as stage-1, stage2, feat")
            self.sizes.append((min(student[1], teacher[1]), min(student[2], teacher[2])))

    def forward(self, student, teacher, batch):
        terms = {}
        for name, size in zip(self.features, self.sizes):
            s, t = channel_maps(student.features[name], size), channel_maps(teacher.features[name], size)
            terms[f"nst_{name}"] = poly_kernel_mean(s, s) + poly_kernel_mean(t, t) - 2 * poly_kernel_mean(s, t)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * sum(terms.values()), {"ce": ce, **terms})
