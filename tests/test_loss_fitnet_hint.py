import contextlib
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from reference import batch as make_batch, cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")

BN_SCALE = 1 / math.sqrt(1 + 1e-5)  # eval-mode BatchNorm with fresh running statistics, weight 1, bias 0


def np_conv(x, w, b, stride, pad):
    """Cross-correlation with zero padding, by explicit loops over the kernel."""
    n, c, h, wd = x.shape
    k_h, k_w = w.shape[2:]
    padded = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    padded[:, :, pad:pad + h, pad:pad + wd] = x
    out_h, out_w = (h + 2 * pad - k_h) // stride + 1, (wd + 2 * pad - k_w) // stride + 1
    out = np.zeros((n, w.shape[0], out_h, out_w)) + b[None, :, None, None]
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, :, i * stride:i * stride + k_h, j * stride:j * stride + k_w]
            out[:, :, i, j] += np.einsum("nckl,ockl->no", patch, w)
    return out


def np_conv_transpose(x, w, b, stride, pad):
    """Transposed convolution: every input value scatters its kernel-weighted copy into the output."""
    n, _, h, wd = x.shape
    k = w.shape[2]
    full = np.zeros((n, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            scattered = np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += scattered
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b[None, :, None, None]


class PlainSGD:
    """Gradient descent with the optimizer interface prepare uses (torch.optim's first use imports torch._dynamo,
    seconds that this file's time limit cannot afford)."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


def make_hint(student_shape, teacher_shape, **kwargs):
    from kd.losses.fitnet_hint import FitNetHint
    torch.manual_seed(0)
    shapes = {"student": {"stage2": student_shape}, "teacher": {"stage2": teacher_shape}}
    args = {"beta": 100.0, "prepare_epochs": 0, "prepare_optimizer": functools.partial(PlainSGD, lr=0.05)}
    return FitNetHint(**{**args, **kwargs}, feature="stage2", feature_shapes=shapes)


@pytest.mark.parametrize("student_size,teacher_size,kind", [(4, 4, "1x1"), (8, 4, "stride2"), (2, 4, "transpose"),
                                                            (6, 4, "valid3")])
def test_hint_against_numpy_regressor(student_size, teacher_size, kind):
    loss = make_hint((5, student_size, student_size), (3, teacher_size, teacher_size)).eval()
    conv = loss.regressor[0]
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(2, 5, student_size, student_size, generator=g)
    ft = torch.rand(2, 3, teacher_size, teacher_size, generator=g)
    zs, y = torch.randn(2, 10, generator=g), torch.tensor([3, 8])
    if kind == "transpose":
        assert isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (4, 4) and conv.stride == (2, 2)
        r = np_conv_transpose(fs.numpy(), w, b, 2, 1)
    else:
        stride, pad = (2, 1) if kind == "stride2" else (1, 0)
        assert conv.kernel_size == {"1x1": (1, 1), "stride2": (3, 3), "valid3": (3, 3)}[kind]
        assert conv.stride == (stride, stride)
        r = np_conv(fs.numpy(), w, b, stride, pad)
    r = np.maximum(r * BN_SCALE, 0)
    assert r.shape == ft.shape
    hint = np.mean((r - ft.numpy()) ** 2)
    total, terms = evaluate(loss, outputs(zs, stage2=fs), outputs(zs, stage2=ft), y)
    assert terms["hint"].item() == pytest.approx(hint, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 100 * hint, rel=1e-10)
    # zero when the teacher's hint is what the regressor makes of the student's layer
    target = loss.regressor(fs).detach()
    assert evaluate(loss, outputs(zs, stage2=fs), outputs(zs, stage2=target), y)[1]["hint"].item() == 0.0


def test_a_student_map_too_small_for_the_regressor_is_refused():
    with pytest.raises(ValueError, match="guided layer is 8x8 and the teacher's hint 32x32"):
        make_hint((5, 8, 8), (3, 32, 32))


def _prepared_run(prepare_epochs):
    """A SmallNet student guided at stage2 by fixed random hints, through a stand-in for the trainer's Preparation."""
    from kd.losses.batch import Progress
    from kd.losses.base import Preparation
    from kd.models import SmallNet
    from kd.taps import Outputs, TappedModel
    torch.manual_seed(0)
    student = TappedModel(SmallNet(), [0.5] * 3, [0.25] * 3, {"stage2": "stage2"})
    loss = make_hint((64, 2, 2), (16, 2, 2), prepare_epochs=prepare_epochs)
    g = torch.Generator().manual_seed(2)  # 8x8 images keep it fast: stage2 is then 64x2x2
    data = [(torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 16, 2, 2, generator=g))]
    messages = []

    def batches(epoch):
        for step, (images, hint) in enumerate(data):
            batch = make_batch(torch.zeros(4, dtype=torch.long), progress=Progress(epoch, step, 1, 5))
            yield dataclasses.replace(batch, images=images), Outputs(torch.zeros(4, 10), {"stage2": hint})
    before = {name: p.detach().clone() for name, p in [*student.named_parameters(), *loss.named_parameters()]}
    if loss.has_preparation:
        loss.prepare(Preparation(student, batches, contextlib.nullcontext, messages.append))
    after = dict([*student.named_parameters(), *loss.named_parameters()])
    changed = {name: (p - before[name]).abs().max().item() for name, p in after.items() if not torch.equal(p, before[name])}
    return loss, changed, messages


def test_the_optional_hint_stage_trains_only_the_guided_layers_and_the_regressor():
    loss, changed, messages = _prepared_run(prepare_epochs=3)
    assert loss.has_preparation and len(messages) == 3 and messages[0].startswith("hint stage epoch 1/3: hint ")
    assert {name.split(".")[1] for name in changed if name.startswith("model.")} == {"stage1", "stage2"}
    assert {f"regressor.{k}" for k in ("0.weight", "1.weight", "1.bias")} <= set(changed)
    # The regressor's conv bias is followed by a BatchNorm in training mode, which subtracts it again: its gradient
    # is zero in exact arithmetic, so it moves at most by rounding (which differs between processors).
    assert changed.get("regressor.0.bias", 0.0) < 1e-9 < changed["regressor.0.weight"]
    hints = [float(m.rsplit(" ", 1)[1]) for m in messages]
    assert hints[-1] < hints[0]
    assert all(p.grad is None for p in loss.parameters())


def test_by_default_there_is_no_hint_stage():
    loss, changed, messages = _prepared_run(prepare_epochs=0)
    assert not loss.has_preparation and not changed and not messages
