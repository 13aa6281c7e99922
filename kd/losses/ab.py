import torch
import torch.nn.functional as F

from kd.losses.base import LossParts
from kd.losses.init_stage import StudentInitialisation, common_size


def boundary_error(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum of the squared hinge errors: s must reach +margin where the teacher neuron is active (t > 0), -margin
    where it is not."""
    return torch.where(t > 0, F.relu(margin - s), F.relu(margin + s)).pow(2).sum()


class ActivationBoundaries(StudentInitialisation):
    """Activation boundaries (Heo, Lee, Yun & Choi, Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons, AAAI 2019, arXiv:1811.03233), as RepDistiller's ABLoss.

    For the pre-ReLU features s_i = C_i(F^S_i) (a 1x1 conv + BN connector to the teacher's channels) and t_i,
    i = 1..n from shallow to deep (the larger map of a pair average-pooled to the smaller), with margin m:
    ab = 3/1000 * sum_i 2^(i-n) / B * sum [ (s+m)^2 [s > -m, t <= 0] + (s-m)^2 [s <= m, t > 0] ]
    (sums over batch, channels and positions; the deepest layer weighs 1, the one before 1/2, ...).
    Preparation (RepDistiller `init`): `prepare_epochs` epochs of SGD on ab alone over the student's layers up to
    the deepest guided feature and the connectors. Main stage: L = CE(z_s, y) + weight * ab with the connectors
    fixed (weight 0 in RepDistiller: the main stage is plain cross-entropy).
    """

    label = "ab"
    argument_ranges = {**StudentInitialisation.argument_ranges, "margin": "[0, inf)", "weight": "[0, inf)"}

    def __init__(self, margin: float, weight: float, prepare_epochs: int, prepare_lr: float, prepare_momentum: float,
                 prepare_weight_decay: float, features: list[str], feature_shapes):
        if not features:
            raise ValueError("ab: give at least one pre-ReLU feature, e.g. [stage-3_preact, stage-2_preact, "
                             "stage-1_preact]")
        super().__init__(features, feature_shapes, prepare_epochs, prepare_lr, prepare_momentum, prepare_weight_decay)
        self.margin, self.weight = margin, weight
        self.layer_weights = [2.0 ** (i - len(self.features) + 1) for i in range(len(self.features))]

    def distance(self, student: dict, teacher: dict) -> torch.Tensor:
        total = 0.0
        for f, layer_weight, connect in zip(self.features, self.layer_weights, self.connectors):
            s, t = common_size(student[f], teacher[f])
            total = total + layer_weight * boundary_error(connect(s), t, self.margin)
        return total / len(student[self.features[0]]) * 3 / 1000

    def scale_note(self) -> str:
        return (f"ab: {self.prepare_epochs} epoch(s) of the AB loss alone on the student's layers before its epochs, "
                f"then weight {self.weight:g}; layer weights {self.layer_weights} on {self.features}")

    def forward(self, student, teacher, batch):
        ab = self.distance(student.features, teacher.features)
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * ab, {"ce": ce, "ab": ab})
