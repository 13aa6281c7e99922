import torch
import torch.nn.functional as F

from kd.losses.base import DistillationLoss, LossParts
from kd.losses.dkd import target_split
from kd.losses.logit_standardization import zscore
from kd.losses.nkd import label_mask
from kd.losses.schedule import ramp


def sample_confidence(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """SCD = T^2 * mean_i KL(b_t || b_s): b_s = [p_s,y, 1 - p_s,y] at the label, b_t = [p_t,m, 1 - p_t,m] at the
    teacher's top class m = argmax z_t, p = softmax(z / T); both bins in log space (`target_split`)."""
    top = label_mask(teacher_logits, teacher_logits.argmax(dim=1))
    log_b_s = target_split(student_logits, label_mask(student_logits, labels), temperature)
    log_b_t = target_split(teacher_logits, top, temperature)
    return temperature**2 * F.kl_div(log_b_s, log_b_t, log_target=True, reduction="sum") / len(labels)


def masked_correlation(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """MCD = T^2 * mean_i KL(q_t || q_s), q = softmax(z / T) over the classes the teacher ranks strictly below the
    label (hidden: z_t,c >= z_t,y, the label and every class the teacher puts at or above it). A sample whose label
    is the teacher's lowest logit keeps no class and adds 0 (the authors fill -1e9: two uniform distributions)."""
    hidden = teacher_logits >= teacher_logits.gather(1, labels[:, None])
    kept = (~hidden).any(dim=1, keepdim=True)
    hidden = hidden & kept  # a row with nothing kept is left whole and weighted 0: no -inf row, no NaN
    log_q_s = F.log_softmax((student_logits / temperature).masked_fill(hidden, float("-inf")), dim=1)
    q_t = F.softmax((teacher_logits / temperature).masked_fill(hidden, float("-inf")), dim=1)
    kl = F.kl_div(log_q_s.masked_fill(hidden, 0.0), q_t, reduction="none")  # xlogy: 0 * log 0 = 0
    return temperature**2 * (kl * kept).sum() / len(labels)


class RLD(DistillationLoss):
    """RLD, refined logit distillation: Sun, Chen, Lyu, Chen, Chen & Wang, "Knowledge Distillation with Refined
    Logits", ICCV 2025 (arXiv:2408.07703).

    SCD (sample confidence) = T_a^2 * mean_i KL([p_t,m, 1 - p_t,m] || [p_s,y, 1 - p_s,y]), p = softmax(z / T_a),
      m = the teacher's top class, y the label;
    MCD (masked correlation) = T^2 * mean_i KL(softmax(z_t / T)|_K || softmax(z_s / T)|_K), K = {c : z_t,c < z_t,y},
      each softmax renormalised over K;
    loss = ce_weight * CE(z_s, y) + w(t) * (alpha * SCD + beta * MCD),  w(t) = min(1, t / (warmup_fraction * epochs))
    after t epochs (kd.losses.schedule.ramp); standardize: z-score both logit vectors first (Sun et al., CVPR 2024).

    Deviations from the authors' rld_loss, same values wherever theirs are finite: SCD's two bins are taken in log
    space (theirs: torch.log of summed probabilities, -inf once the other classes underflow), and MCD hides classes
    with -inf rather than -1e9 (a row with every class hidden adds 0 in both).
    """

    argument_ranges = {"ce_weight": "[0, inf)", "alpha": "[0, inf)", "beta": "[0, inf)", "temperature": "(0, inf)",
                       "scd_temperature": "(0, inf)", "warmup_fraction": "[0, 1]"}

    def __init__(self, ce_weight: float, alpha: float, beta: float, temperature: float, scd_temperature: float,
                 warmup_fraction: float, standardize: bool):
        super().__init__()
        self.ce_weight, self.alpha, self.beta = ce_weight, alpha, beta
        self.temperature, self.scd_temperature = temperature, scd_temperature
        self.warmup_fraction, self.standardize = warmup_fraction, standardize

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        z_s, z_t = student.logits, teacher.logits
        if self.standardize:
            z_s, z_t = zscore(z_s), zscore(z_t)
        scd = sample_confidence(z_s, z_t, batch.labels, self.scd_temperature)
        mcd = masked_correlation(z_s, z_t, batch.labels, self.temperature)
        warmup = ramp(batch.progress, fraction=self.warmup_fraction)
        return LossParts(self.ce_weight * ce, warmup * (self.alpha * scd + self.beta * mcd),
                         {"ce": ce, "scd": scd, "mcd": mcd})
