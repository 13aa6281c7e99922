from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossParts, Preparation


def conv_regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Sequential:
    """RepDistiller's ConvReg from the (C, H, W) shapes: a 3x3 stride-2 conv for a student map twice the teacher's,
    a 4x4 stride-2 transposed conv for one half of it, else a valid conv of kernel 1 + H_s - H_t (1x1 for equal
    sizes; the paper's regressor); then BN and ReLU (the hint is taken after ReLU)."""
    (cs, hs, ws), (ct, ht, wt) = student, teacher
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise ValueError(f"fitnet_hint: the student's guided layer is {hs}x{ws} and the teacher's hint {ht}x{wt}; "
                         f"the regressor maps a student map at least as large as the teacher's, or half its size. "
                         f"Choose a deeper teacher stage or a shallower student stage (method.loss.feature)")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


class FitNetHint(DistillationLoss):
    """Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
    (arXiv:1412.6550), in RepDistiller's `hint` form (also mdistiller's FITNET).

    A regressor r (conv chosen from the two spatial sizes + BN + ReLU) maps the student's guided layer to the
    teacher's hint layer, the same stage of each network:
        hint = MSE(r(F_s), F_t), a mean over the teacher's B*C*H*W values;  loss = CE(z_s, y) + beta * hint.
    With prepare_epochs > 0, the paper's first stage runs before: the student's layers up to the guided layer and
    the regressor are trained on the hint alone for that many epochs (prepare_optimizer, constant rate).
    """

    argument_ranges = {"beta": "[0, inf)", "prepare_epochs": "[0, inf)"}

    def __init__(self, beta: float, prepare_epochs: int, prepare_optimizer: Callable[..., torch.optim.Optimizer],
                 feature: str, feature_shapes):
        super().__init__()
        self.beta, self.feature = beta, feature
        self.prepare_epochs, self.prepare_optimizer = prepare_epochs, prepare_optimizer
        self.teacher_shape = tuple(feature_shapes["teacher"][feature])
        self.regressor = conv_regressor(tuple(feature_shapes["student"][feature]), self.teacher_shape)

    def hint(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.regressor(student_feature), teacher_feature.detach())

    def scale_note(self) -> str:
        c, h, w = self.teacher_shape
        return (f"fitnet_hint: MSE averaged over the teacher's {c}x{h}x{w} = {c * h * w} hint values per sample; "
                f"beta {self.beta:g} acts as {self.beta / (c * h * w):.4g} per unit of their summed squared error")

    def forward(self, student, teacher, batch):
        hint = self.hint(student.features[self.feature], teacher.features[self.feature])
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, self.beta * hint, {"ce": ce, "hint": hint})

    def prepare(self, preparation: Preparation) -> None:
        """Stage 1: the hint alone trains the regressor and the student parameters the guided layer depends on."""
        student, optimizer = preparation.student, None
        student.train()
        self.train()
        for epoch in range(self.prepare_epochs):
            total, count = 0.0, 0
            for batch, teacher in preparation.batches(epoch):
                with preparation.autocast():
                    guided = student(batch.images).features[self.feature]
                hint = self.hint(guided.to(self.regressor[1].weight.dtype), teacher.features[self.feature])  # fp32
                if optimizer is None:
                    optimizer = self.prepare_optimizer([*self._guided_parameters(student, hint), *self.parameters()])
                optimizer.zero_grad(set_to_none=True)
                hint.backward()
                optimizer.step()
                total, count = total + hint.detach(), count + 1
            preparation.log(f"hint stage epoch {epoch + 1}/{self.prepare_epochs}: hint {(total / count).item():.4f}")
        student.zero_grad(set_to_none=True)
        self.zero_grad(set_to_none=True)

    @staticmethod
    def _guided_parameters(student: nn.Module, hint: torch.Tensor) -> list[nn.Parameter]:
        """The student's parameters up to the guided layer: those the hint depends on."""
        params = [p for p in student.parameters() if p.requires_grad]
        grads = torch.autograd.grad(hint, params, retain_graph=True, allow_unused=True)
        return [p for p, g in zip(params, grads) if g is not None]
