from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts
from kd.losses.catkd import Classifiers
from kd.losses.dkd import target_split
from kd.losses.nkd import non_target_term, target_term
from kd.losses.schedule import ramp

BASES = ("kd", "dkd", "nkd")
NKD_CLASSES = ("all", "non_target")


def regions(features: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """Every sample's regions at each scale m (m x m cells), as rows (regions * batch) x channels, region-major (all
    samples' first region, then their second, ...); and the whole map's mean, batch x channels.

    As the authors' SPP: the map is average-pooled to the finest scale first and every scale (and the whole map) is
    pooled from that (a 2x2 map is first repeated to 4x4; the same cells as pooling directly where sizes divide)."""
    finest = F.adaptive_avg_pool2d(features, max(scales))
    cells = torch.cat([F.adaptive_avg_pool2d(finest, m).flatten(2) for m in scales], dim=2)  # B x C x R
    return cells.permute(2, 0, 1).reshape(-1, features.shape[1]), F.adaptive_avg_pool2d(finest, 1).flatten(1)


def kd_per_row(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)) of each row."""
    log_p_s, log_p_t = F.log_softmax(z_s / temperature, dim=1), F.log_softmax(z_t / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(1)


def decoupled_kl_per_row(z_s, z_t, target, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of each row, T^2-scaled: `kd.losses.dkd.decoupled_kl` before its mean over the batch."""
    gt = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target[:, None], True)
    tckd = F.kl_div(target_split(z_s, gt, temperature), target_split(z_t, gt, temperature), log_target=True,
                    reduction="none").sum(1)
    log_hat_s = F.log_softmax((z_s / temperature).masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
    hat_t = F.softmax((z_t / temperature).masked_fill(gt, float("-inf")), dim=1)
    nckd = F.kl_div(log_hat_s, hat_t, reduction="none").sum(1)  # xlogy: 0 * log 0 = 0 at the gt column
    return temperature**2 * tckd, temperature**2 * nckd


def nkd_per_row(z_s, z_t, target, temperature: float, classes: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, non-target) NKD terms of each row, T^2 in the second (`kd.losses.nkd` before its mean).

    classes "all": the second term over every class, the label's too, unnormalised,
    -T^2 sum_c softmax(z_t/T)_c log softmax(z_s/T)_c, as the SDD authors' nkd_loss computes it (its mask,
    ones_like(z).scatter_(1, y, 1), keeps every column); "non_target": over the classes other than the label,
    both renormalised, as NKD's paper (and kd.losses.nkd) has it."""
    if classes == "all":
        soft, log_student = F.softmax(z_t / temperature, dim=1), F.log_softmax(z_s / temperature, dim=1)
        second = -temperature**2 * (soft * log_student).sum(1)
    else:
        second = non_target_term(z_s, z_t, target, temperature)
    return target_term(z_s, z_t, target), second


class ScaleDecoupledKD(DistillationLoss):
    """Wei, Luo & Luo, "Scale Decoupled Distillation", CVPR 2024 (arXiv:2403.13512; CVPR title "Scaled Decoupled
    Distillation"): a logit loss applied to local logits, region by region, at several scales.

    Regions: the map each network's classifier pools, average-pooled to m x m for every scale m in `scales` (M);
    each region's vector through the network's own classifier (weights and bias) gives local logits z^(r),
    r = 1..R, R = sum_m m^2 (m = 1: the global logits). With the base loss l, per sample:
        w_r,i = 1 where the teacher's region r is right about y_i exactly when its global logits are (consistent),
                complementary_weight where one is right and the other wrong (complementary)
        L_SDD = 1/(R B) sum_r sum_i w_r,i * l(z_s^(r,i), z_t^(r,i), y_i)
        loss  = ce_weight * CE(z_s, y) + ramp(t) * kd_weight * L_SDD
    base "kd" (SD-KD): l = T^2 KL(softmax(z_t/T) || softmax(z_s/T)); base "dkd" (SD-DKD): l = alpha * TCKD +
    beta * NCKD, DKD's terms per sample (kd.losses.dkd); base "nkd" (SD-NKD): l = -T_y log S_y + gamma * N, NKD's
    terms per sample (Yang et al., ICCV 2023; T = softmax(z_t), S = softmax(z_s)), with `nkd_classes` "all" (the
    authors' SDD_nkd.py) N = -T^2 sum_c softmax(z_t/T)_c log softmax(z_s/T)_c over every class, the label's too,
    or "non_target" (NKD's paper) N = -T^2 sum_{c != y} of the same, both renormalised over c != y.
    ramp = min(1, t / (warmup_fraction * epochs)) after t epochs (kd.losses.schedule.ramp). Gradients reach the
    student's map and its classifier; the teacher's is a frozen copy.
    `features`: [the map the classifier pools, the embedding tap that names the classifier (`<module>:input`)].
    """

    argument_ranges = {"ce_weight": "[0, inf)", "kd_weight": "[0, inf)", "temperature": "(0, inf)",
                       "alpha": "[0, inf)", "beta": "[0, inf)", "scales": "[1, inf)",
                       "complementary_weight": "[0, inf)", "warmup_fraction": "[0, 1]", "gamma": "[0, inf)"}

    def __init__(self, base: str, ce_weight: float, kd_weight: float, temperature: float, alpha: float | None,
                 beta: float | None, scales: list[int], complementary_weight: float, warmup_fraction: float,
                 features: list[str], feature_shapes, student_model: nn.Module, student_taps: Mapping[str, str],
                 teacher_model: nn.Module, teacher_taps: Mapping[str, str], gamma: float | None = None,
                 nkd_classes: str | None = None):
        super().__init__()
        self._check(base, alpha, beta, gamma, nkd_classes, scales, features)
        self.base, self.ce_weight, self.kd_weight, self.temperature = base, ce_weight, kd_weight, temperature
        self.alpha, self.beta, self.gamma, self.nkd_classes, self.scales = alpha, beta, gamma, nkd_classes, list(scales)
        self.complementary_weight, self.warmup_fraction = complementary_weight, warmup_fraction
        self.feature, embedding = features
        self.classifiers = Classifiers(self.feature, embedding, feature_shapes, student_model, student_taps,
                                       teacher_model, teacher_taps)

    @staticmethod
    def _check(base, alpha, beta, gamma, nkd_classes, scales, features) -> None:
        if base not in BASES:
            raise ValueError(f"sdd: base {base!r} is not one of {list(BASES)}")
        if (base == "dkd") != (alpha is not None) or (base == "dkd") != (beta is not None):
            raise ValueError(f"sdd: alpha and beta weigh DKD's two terms: set both for base 'dkd', both null for bases "
                             f"'kd' and 'nkd' (base {base!r}, alpha {alpha!r}, beta {beta!r})")
        if (base == "nkd") != (gamma is not None) or (base == "nkd") != (nkd_classes is not None):
            raise ValueError(f"sdd: gamma and nkd_classes shape NKD's non-target term: set both for base 'nkd', both "
                             f"null for bases 'kd' and 'dkd' (base {base!r}, gamma {gamma!r}, nkd_classes "
                             f"{nkd_classes!r})")
        if nkd_classes is not None and nkd_classes not in NKD_CLASSES:
            raise ValueError(f"sdd: nkd_classes {nkd_classes!r} is not one of {list(NKD_CLASSES)} (all: every class, "
                             f"as the SDD authors' nkd_loss; non_target: the classes other than the label, as NKD's "
                             f"paper)")
        if not scales or any(isinstance(m, bool) or not isinstance(m, int) for m in scales):
            raise ValueError(f"sdd: scales {scales!r} must be a list of whole numbers of cells per side: [1, 2, 4]")
        if len(features) != 2:
            raise ValueError(f"sdd: features {list(features)} must be [the map the classifier pools, the embedding]")

    def scale_note(self) -> str:
        counts = " + ".join(f"{m * m}" for m in self.scales)
        return (f"sd_{self.base}: {counts} = {sum(m * m for m in self.scales)} regions per sample, complementary ones "
                f"weighted {self.complementary_weight:g}; the {self.base} term is averaged over regions and samples, "
                f"so kd_weight {self.kd_weight:g} acts on it as on one global {self.base} term")

    def region_logits(self, features: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.classifiers.weights(role)
        cells, whole = regions(features, self.scales)
        return F.linear(cells, weight, bias), F.linear(whole, weight, bias)

    def base_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.base == "kd":
            return kd_per_row(z_s, z_t, self.temperature)
        if self.base == "nkd":
            target_part, non_target_part = nkd_per_row(z_s, z_t, target, self.temperature, self.nkd_classes)
            return target_part + self.gamma * non_target_part
        tckd, nckd = decoupled_kl_per_row(z_s, z_t, target, self.temperature)
        return self.alpha * tckd + self.beta * nckd

    def forward(self, student, teacher, batch):
        z_s, _ = self.region_logits(student.features[self.feature], "student")
        z_t, global_t = self.region_logits(teacher.features[self.feature].detach(), "teacher")
        labels = batch.labels
        count = len(z_t) // len(labels)  # regions per sample
        target = labels.repeat(count)  # region-major, as the rows
        consistent = (z_t.argmax(1) == target) == (global_t.argmax(1) == labels).repeat(count)
        rows = self.base_loss(z_s, z_t, target)
        sdd = torch.where(consistent, rows, self.complementary_weight * rows).mean()
        ce = F.cross_entropy(student.logits, labels)
        distillation = ramp(batch.progress, fraction=self.warmup_fraction) * self.kd_weight * sdd
        return LossParts(self.ce_weight * ce, distillation, {"ce": ce, "sdd": sdd})
