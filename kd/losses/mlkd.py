import torch
import torch.nn.functional as F
from torch import nn

from kd.augment import RandAugment, random_flip
from kd.losses.base import DistillationLoss, LossParts
from kd.losses.entropy_aware import ARGUMENT_RANGES as ENTROPY_RANGES, entropy_weights
from kd.losses.logit_standardization import zscore

MASKING = ("released", "per_sample")


def at_or_below_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """values <= their `percentile`-th percentile (linear interpolation, as numpy.percentile)."""
    return values <= torch.quantile(values, percentile / 100.0)


def instance_term(student_logits, teacher_logits, temperature, weight):
    """mean over the batch of weight_i * T^2 * KL(softmax(z_t,i/T) || softmax(z_s,i/T))."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(1)
    return temperature**2 * (kl * weight).mean()


def gram_gap(p_student, p_teacher, weight):
    """Squared gap between the Gram matrices P P^T of two prediction sets, column j weighted by weight_j, summed."""
    gap = (p_teacher @ p_teacher.t() - p_student @ p_student.t()).pow(2)
    return (gap * weight).sum()


class MLKD(DistillationLoss):
    """Multi-level logit distillation (Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023; code:
    Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py).

    For every T in `temperatures`, with P = softmax(z/T) (B x C) and per-sample weights w_i, per-class weights u_b:
      instance_T = mean_i w_i * T^2 * KL(P_t,i || P_s,i)
      batch_T    = sum_{i, j} w_j * ((P_t P_t^T - P_s P_s^T)_ij)^2 / B      (sample correlations)
      class_T    = sum_{a, b} u_b * ((P_t^T P_t - P_s^T P_s)_ab)^2 / C      (class correlations)
    m_i = 1 where the teacher's top probability (T = 1) for sample i is at or below the batch's `mask_percentile`-th
    percentile of them; k_b = 1 where the teacher's probability mass for class b over the batch is at or below that
    percentile of the class masses. masking "released" (KD_ours.py: each batch-averaged term times the mask, then
    averaged): w_i = mean(m), u_b = mean(k), the kept fractions, for every sample and class; "per_sample": w = m,
    u = k, the masks select samples and classes. mask_percentile = 100 keeps everything (the unmasked paper loss).
    loss = ce_weight * CE(z_s, y) + kd_weight * sum_T (instance_T + batch_T + class_T)
           + kd_weight * sum_{T in weak_unmasked_temperatures} mean_i T^2 KL(P_t,i || P_s,i)  ("instance_unmasked")

    strong_view (the released total): the loss runs both networks on a strong view z' of the batch itself (the student
    in its training mode, the teacher without gradients; each normalises with its own mean and std) and adds
      + kd_weight * sum_{T in strong_temperatures} mean_i T^2 KL(P'_t,i || P'_s,i)   (no mask; "instance_strong")
      + ce_weight * CE(z'_s, y)                                                      ("ce_strong")
    The strong view: the batch mirrored left-right with probability 1/2 per image, then kd.augment.RandAugment
    (`randaugment_ops` ops + Cutout up to `cutout` of the width). KD_ours.py's strong-view batch and class terms are
    computed there but never added, so not here either.

    standardize: the instance terms (all three kinds) read z-scored logits Z(z) = (z - mean) / (std + 1e-7) (Sun et
    al., CVPR 2024, arXiv:2403.01427), T then the base temperature; the batch and class terms and the masks read the
    raw logits, as the LS authors' MLKD.py applies it (only inside its kd_loss).
    entropy_aware: EA-MLD (Su et al., ICCV 2025, arXiv:2311.13621; the authors' KD_ours.py): each instance term's w_i is
    multiplied by w_EA,i = H_t,i (1 + H_s,i / H_ub) / 2 (kd.losses.entropy_aware; entropies of softmax(z/T') of the
    raw logits of the view the term reads), the same at every T; the batch and class terms are not reweighted.
    """

    argument_ranges = {"temperatures": "(0, inf)", "mask_percentile": "[0, 100]", "ce_weight": "[0, inf)",
                       "kd_weight": "[0, inf)", "strong_temperatures": "(0, inf)",
                       "weak_unmasked_temperatures": "(0, inf)", "randaugment_ops": "[0, inf)", "cutout": "[0, 1]",
                       **ENTROPY_RANGES}

    def __init__(self, temperatures: list[float], mask_percentile: float, masking: str, ce_weight: float,
                 kd_weight: float, standardize: bool, entropy_aware: bool = False,
                 entropy_temperature: float | None = None, entropy_bound: float | None = None,
                 weak_unmasked_temperatures: list[float] = (), strong_view: bool = False,
                 strong_temperatures: list[float] = (), randaugment_ops: int | None = None,
                 cutout: float | None = None, student_normalization=None, teacher_normalization=None,
                 student_model: nn.Module | None = None, teacher_model: nn.Module | None = None):
        super().__init__()
        if masking not in MASKING:
            raise ValueError(f"mlkd: masking {masking!r} is not one of {list(MASKING)}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.weak_unmasked_temperatures = tuple(float(t) for t in weak_unmasked_temperatures)
        self.mask_percentile, self.masking = mask_percentile, masking
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.standardize = standardize
        self.weighting = entropy_weights("MLKD", entropy_aware, entropy_temperature, entropy_bound)
        self.strong_view = strong_view
        if strong_view:
            self._strong_setup(strong_temperatures, randaugment_ops, cutout, student_normalization,
                               teacher_normalization, student_model, teacher_model)

    def _strong_setup(self, temperatures, ops, cutout, student_normalization, teacher_normalization, student_model,
                      teacher_model) -> None:
        given = {"randaugment_ops": ops, "cutout": cutout, "student_normalization": student_normalization,
                 "teacher_normalization": teacher_normalization}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"mlkd: strong_view needs method.loss.{missing} (see conf/method/mlkd.yaml)")
        if student_model is None or teacher_model is None:
            raise ValueError("mlkd: strong_view runs the networks itself and needs student_model and teacher_model")
        self.strong_temperatures = tuple(float(t) for t in temperatures)
        self.augment = RandAugment(ops, cutout)
        # a tuple, not submodules: the student's parameters are the student's, the teacher stays out of the loss's
        # state and its train()/eval()
        self.networks = (student_model, teacher_model)
        for role, normalization in (("student", student_normalization), ("teacher", teacher_normalization)):
            for stat in ("mean", "std"):
                self.register_buffer(f"{role}_{stat}", torch.tensor(list(normalization[stat])).view(1, -1, 1, 1),
                                     persistent=False)

    def masks(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample mask over B, class mask over C) from the teacher's T = 1 predictions, as 0/1 floats."""
        p = F.softmax(teacher_logits, dim=1)
        samples = at_or_below_percentile(p.max(1).values, self.mask_percentile)
        classes = at_or_below_percentile(p.sum(0), self.mask_percentile)
        return samples.to(p.dtype), classes.to(p.dtype)

    def strong_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) logits on a strong view of the [0, 1] images: KD_ours.forward_train's image_strong."""
        student, teacher = self.networks
        strong = self.augment(random_flip(images))
        z_s = student((strong - self.student_mean) / self.student_std)
        with torch.no_grad():
            z_t = teacher((strong - self.teacher_mean) / self.teacher_std)
        return z_s, z_t

    def unmasked_instance(self, zs: torch.Tensor, zt: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
        """sum_T mean_i w_EA,i T^2 KL(P_t,i || P_s,i), no mask (w_EA = 1 without entropy_aware; z-scored logits if
        standardize)."""
        weights = 1.0 if self.weighting is None else self.weighting(zs, zt)
        ks, kt = (zscore(zs), zscore(zt)) if self.standardize else (zs, zt)
        return sum((instance_term(ks, kt, t, weights) for t in temperatures), zs.new_zeros(()))

    def forward(self, student, teacher, batch):
        zs, zt = student.logits, teacher.logits
        samples, classes = self.masks(zt)
        if self.masking == "released":  # the code's reduced terms times its masks, averaged: the kept fractions
            samples, classes = samples.mean().expand_as(samples), classes.mean().expand_as(classes)
        ea = None if self.weighting is None else self.weighting(zs, zt)
        weights = samples if ea is None else samples * ea
        ks, kt = (zscore(zs), zscore(zt)) if self.standardize else (zs, zt)  # the instance terms' logits
        instance = batch_level = class_level = zs.new_zeros(())
        for t in self.temperatures:
            ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
            instance = instance + instance_term(ks, kt, t, weights)
            batch_level = batch_level + gram_gap(ps, pt, samples) / len(zs)
            class_level = class_level + gram_gap(ps.t(), pt.t(), classes) / zs.shape[1]
        ce = F.cross_entropy(zs, batch.labels)
        terms = {"ce": ce, "instance": instance, "batch": batch_level, "class": class_level}
        if self.weak_unmasked_temperatures:
            terms["instance_unmasked"] = self.unmasked_instance(zs, zt, self.weak_unmasked_temperatures)
        if self.strong_view:
            zs_strong, zt_strong = (z.to(zs.dtype) for z in self.strong_logits(batch.images))
            terms["instance_strong"] = self.unmasked_instance(zs_strong, zt_strong, self.strong_temperatures)
            terms["ce_strong"] = F.cross_entropy(zs_strong, batch.labels)
        task = ce + terms.get("ce_strong", 0.0)
        distillation = sum(terms[k] for k in ("instance", "batch", "class", "instance_unmasked", "instance_strong")
                           if k in terms)
        weighting = {} if ea is None else {"entropy_weight": ea.mean()}
        return LossParts(self.ce_weight * task, self.kd_weight * distillation, {**terms, **weighting})
