import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts

TEACHER_SIGNS = ("nonnegative_sum", "svd")

class TopRightSingularVectors(torch.autograd.Function):
    """The first n right singular vectors of each matrix M (B, P, C), as columns (B, C, n), and their singular
    values (B, n) (not differentiated).

    The backward pass is the exact derivative of the eigenvectors of M^T M, dv_i = sum_j v_j v_j^T dA v_i /
    (s_i^2 - s_j^2), with the terms of (numerically) equal squared singular values dropped: torch's own SVD
    backward divides by those gaps for every pair of components, the unused ones included, and gives inf or NaN
    for repeated or zero singular values (rank-deficient ReLU maps, C > P)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(m, s, v)
        ctx.n = n
        singular_values = s[:, :n].clone()
        ctx.mark_non_differentiable(singular_values)
        return v[..., :n], singular_values

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_singular_values):
        m, s, v = ctx.saved_tensors
        lam = s.pow(2)
        lam_n, v_n = lam[:, :ctx.n], v[..., :ctx.n]
        tol = torch.finfo(lam.dtype).eps * lam[:, :1].clamp_min(torch.finfo(lam.dtype).tiny)  # (B, 1)
        gap = lam_n[:, None, :] - lam[:, :, None]  # [b, j, i] = lambda_i - lambda_j
        projected = v.transpose(-2, -1) @ grad     # [b, j, i] = v_j . g_i
        apart = gap.abs() > tol[:, :, None]
        g_a = v @ torch.where(apart, projected / torch.where(apart, gap, 1.0), 0.0) @ v_n.transpose(-2, -1)
        if v.shape[-1] < v.shape[-2]:  # directions outside the span of the P rows: eigenvalue 0
            rest = grad - v @ projected
            inverse = torch.where(lam_n > tol, 1.0 / torch.where(lam_n > tol, lam_n, 1.0), 0.0)
            g_a = g_a + (rest * inverse[:, None, :]) @ v_n.transpose(-2, -1)
        return m @ (g_a + g_a.transpose(-2, -1)), None


def as_matrix(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): rows are positions, so the right singular vectors live in channel space."""
    return f.flatten(2).transpose(1, 2)


def rbf(v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """exp(-(v[a] - previous[c])^2 / 8) for every channel a of this layer and c of the previous one: (B, C, C', k)."""
    return torch.exp(-(v[:, :, None, :] - previous[:, None, :, :]).pow(2) / 8)


class KDSVD(DistillationLoss):
    """Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018
    (arXiv:1807.06819), as RepDistiller's KDSVD computes it.

    For each layer i (shallow to deep), each sample's feature map as a (H*W) x C matrix: the teacher's first k
    right singular vectors v_t; the student's first k+3, of which the one most aligned (largest |cos|) with each
    teacher vector is kept (among those of non-zero singular values), its sign matched; both scaled by the
    teacher's first k singular values normalised to unit norm (a no-op for k = 1). Between consecutive layers
    K[a, c] = exp(-(v_i[a] - v_i-1[c])^2 / 8), and
        loss = CE(z_s, y) + weight * sum_{i>=1} (1/B) * sum_{b,a,c,j} (K_s - K_t)^2.
    The kernel depends on the relative sign of consecutive layers' vectors, and an SVD's sign is arbitrary.
    teacher_sign "nonnegative_sum" flips each teacher vector so that its entries sum to >= 0 (for post-ReLU maps,
    the non-negative principal vector); "svd" keeps the sign the SVD returns, as RepDistiller does (LAPACK's on the
    CPU; another backend may return other signs, and with them another value).
    Where the channel counts differ, a trainable 1x1 conv + BN maps the student's features to the teacher's first.
    """

    argument_ranges = {"weight": "[0, inf)", "components": "[1, inf)"}

    def __init__(self, weight: float, components: int, features: list[str], teacher_sign: str, feature_shapes):
        super().__init__()
        if teacher_sign not in TEACHER_SIGNS:
            raise ValueError(f"kdsvd: teacher_sign {teacher_sign!r} is not one of {list(TEACHER_SIGNS)}")
        self.weight, self.components, self.features = weight, components, list(features)
        self.teacher_sign = teacher_sign
        if len(self.features) < 2:
            raise ValueError(f"kdsvd: features {self.features}: the loss relates consecutive layers, give at least two")
        self.connectors = nn.ModuleDict()
        for name in self.features:
            student, teacher = feature_shapes["student"][name], feature_shapes["teacher"][name]
            if len(student) != 3 or len(teacher) != 3:
                raise ValueError(f"kdsvd: feature {name!r} is {student} in the student and {teacher} in the teacher; "
                                 f"the SVD needs feature maps (C, H, W), e.g. stage names")
            if student[0] != teacher[0]:
                self.connectors[name] = nn.Sequential(nn.Conv2d(student[0], teacher[0], 1, bias=False),
                                                      nn.BatchNorm2d(teacher[0]))

    def _teacher_vectors(self, f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(as_matrix(f), full_matrices=False)
        v = vh[:, :self.components].transpose(1, 2)                        # (B, C, k)
        if self.teacher_sign == "nonnegative_sum":
            v = torch.where(v.sum(1, keepdim=True) < 0, -v, v)
        scale = F.normalize(s[:, :self.components], dim=1)  # (B, k): teacher singular values, unit norm
        return v, scale

    def _student_vectors(self, f: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        m = as_matrix(f)
        candidates, s = TopRightSingularVectors.apply(m, self.components + 3)     # (B, C, k+3), (B, k+3)
        cosine = candidates.transpose(1, 2) @ teacher                             # (B, k+3, k)
        # a vector of a zero singular value is any direction of the null space: never the aligned one
        rank_tol = s[:, :1] * max(m.shape[1:]) * torch.finfo(s.dtype).eps
        eligible = (s > rank_tol) | (torch.arange(s.shape[1], device=s.device) == 0)
        best = cosine.abs().where(eligible[:, :, None], -1.0).argmax(dim=1, keepdim=True)  # (B, 1, k)
        sign = torch.sign(cosine.gather(1, best))
        return candidates.gather(2, best.expand(-1, candidates.shape[1], -1)) * sign

    def forward(self, student, teacher, batch):
        distance, previous = 0.0, None
        for name in self.features:
            fs = student.features[name]
            fs = self.connectors[name](fs) if name in self.connectors else fs
            v_t, scale = self._teacher_vectors(teacher.features[name].detach())
            v_s = self._student_vectors(fs, v_t)
            v_t, v_s = v_t * scale[:, None, :], v_s * scale[:, None, :]
            if previous is not None:
                distance = distance + (rbf(v_s, previous[0]) - rbf(v_t, previous[1])).pow(2).sum() / len(fs)
            previous = v_s, v_t
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.weight * distance, {"ce": ce, "svd": distance})
