import numpy as np
import pytest
import torch
from torch import nn

from preparation import Stage
from reference import cross_entropy as np_ce, evaluate, outputs


def _ft(student_shape, teacher_shape, beta=500.0, **prepare):
    from kd.losses.ft import FactorTransfer
    torch.manual_seed(1)
    args = {"prepare_epochs": 1, "prepare_lr": 0.1, "prepare_momentum": 0.9, "prepare_weight_decay": 5e-4, **prepare}
    shapes = {"student": {"feat": student_shape}, "teacher": {"feat": teacher_shape}}
    return FactorTransfer(beta=beta, rate=0.5, feature="feat", feature_shapes=shapes, **args)


def _leaky(x):
    return np.where(x > 0, x, 0.1 * x)


def _conv3x3(x, w, b):
    """nn.Conv2d(k=3, stride 1, padding 1): out[o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] in[c, y+i-1, x+j-1]."""
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out


def _deconv3x3(x, w, b):
    """nn.ConvTranspose2d(k=3, stride 1, padding 1): each input value in[c, y, x] adds w[c, o, i, j] at output
    position (y+i-1, x+j-1), kept where it falls inside the map."""
    n, _, h, wd = x.shape
    out = np.zeros((n, w.shape[1], h + 2, wd + 2))
    for i in range(3):
        for j in range(3):
            out[:, :, i:i + h, j:j + wd] += np.einsum("nchw,co->nohw", x, w[:, :, i, j])
    return out[:, :, 1:h + 1, 1:wd + 1] + b[None, :, None, None]


def _stack(module, x, layer):
    for m in module:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            x = _leaky(layer(x, m.weight.detach().numpy(), m.bias.detach().numpy()))
    return x


def _unit(a):
    return a / np.sqrt((a**2).sum(axis=1, keepdims=True))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("teacher_size", [4, 8])  # 8: the teacher's factor is average-pooled to the student's 4x4
def test_ft_against_numpy_convolutions(teacher_size):
    loss = _ft((3, 4, 4), (4, teacher_size, teacher_size))
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g), torch.rand(2, 4, teacher_size, teacher_size, generator=g)
    zs, y = torch.randn(2, 10, generator=g), torch.tensor([3, 7])
    factor_s = _stack(loss.translator, fs.numpy(), _conv3x3)                 # 2 x 2 x 4 x 4 (k = 0.5 of 4)
    factor_t = _stack(loss.paraphraser.encoder, ft.numpy(), _conv3x3)
    factor_t = factor_t.reshape(2, 2, 4, teacher_size // 4, 4, teacher_size // 4).mean(axis=(3, 5))
    expected = np.mean(np.abs(_unit(factor_s.reshape(2, -1)) - _unit(factor_t.reshape(2, -1))))
    total, terms = evaluate(loss, outputs(zs, feat=fs), outputs(zs, feat=ft), y)
    assert terms["ft"].item() == pytest.approx(expected, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 500 * expected, rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_ft_reconstruction_against_numpy_convolutions():
    loss = _ft((3, 4, 4), (4, 4, 4))
    ft = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    factor = _stack(loss.paraphraser.encoder, ft.numpy(), _conv3x3)
    rebuilt = _stack(loss.paraphraser.decoder, factor, _deconv3x3)
    assert loss.reconstruction(ft).item() == pytest.approx(np.mean(np.abs(rebuilt - ft.numpy())), rel=1e-10)
    assert [m.weight.shape[:2] for m in loss.paraphraser.encoder if hasattr(m, "weight")] == [(4, 4), (2, 4), (2, 2)]
    assert [m.weight.shape[:2] for m in loss.translator if hasattr(m, "weight")] == [(3, 3), (2, 3), (2, 2)]


@pytest.mark.usefixtures("float64")
def test_ft_factor_distance_invariants():
    # with the translator and the encoder set to the identity, the features are the factors
    loss = _ft((2, 1, 1), (2, 1, 1), beta=1.0)
    loss.translator, loss.paraphraser.encoder = nn.Identity(), nn.Identity()
    zs, y = torch.zeros(1, 10), torch.tensor([0])
    ft = lambda a, b: evaluate(loss, outputs(zs, feat=a), outputs(zs, feat=b), y)[1]["ft"].item()  # noqa: E731
    e1, e2 = torch.tensor([1.0, 0]).view(1, 2, 1, 1), torch.tensor([0, 1.0]).view(1, 2, 1, 1)
    assert ft(e1, e2) == pytest.approx(1.0)  # |1 - 0| + |0 - 1| over 2 elements
    assert ft(3 * e1, 0.5 * e1) == 0.0  # each factor is normalised as a whole: positive scales do not matter

    loss = _ft((4, 3, 3), (4, 3, 3), beta=1.0)
    loss.translator, loss.paraphraser.encoder = nn.Identity(), nn.Identity()
    zs, y = torch.zeros(3, 10), torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    base = ft(a, b)
    assert 0 < base <= 2 / 36**0.5
    assert ft(a * torch.tensor([2.0, 0.1, 9]).view(3, 1, 1, 1), b) == pytest.approx(base, rel=1e-12)  # per image
    assert ft(torch.ones(3, 4, 3, 3), -torch.ones(3, 4, 3, 3)) == pytest.approx(2 / 36**0.5)  # the bound is reached
    # the whole factor is compared, channel by channel: swapping two channels of one side changes the loss
    # (RepDistiller's channel-mean form would not see it)
    assert ft(a[:, [1, 0, 2, 3]], a) > 0.05


def test_ft_preparation_trains_the_paraphraser_only():
    stage = Stage(["feat"])
    loss = _ft(stage.shapes["student"]["feat"], stage.shapes["teacher"]["feat"], prepare_epochs=2)
    translator_params = [p for p in loss.translator.parameters()]
    assert list(loss.parameters()) == translator_params  # the paraphraser is never in the student's optimizer
    paraphraser_before = {k: v.clone() for k, v in loss.paraphraser.state_dict().items()}
    translator_before = {k: v.clone() for k, v in loss.translator.state_dict().items()}
    loss.prepare(stage.preparation())

    assert not any(stage.student_changes().values())  # the student is not involved at all
    assert stage.teacher_unchanged()
    assert all(torch.equal(v, loss.translator.state_dict()[k]) for k, v in translator_before.items())
    assert all(not torch.equal(v, loss.paraphraser.state_dict()[k]) for k, v in paraphraser_before.items())
    assert not any(b.requires_grad for b in loss.paraphraser.buffers()) and list(loss.parameters()) == translator_params
    assert [m.split(":")[0] for m in stage.messages] == ["ft paraphraser epoch 1/2", "ft paraphraser epoch 2/2"]
    assert stage.logged()[1] < stage.logged()[0]
    # afterwards the main loss leaves the paraphraser without gradients: only the translator and the student learn
    parts = loss(stage.student(stage.batches[0][0].images), stage.batches[0][1], stage.batches[0][0])
    parts.total.backward()
    assert all(p.grad is not None for p in translator_params)
    assert all(b.grad is None for b in loss.paraphraser.buffers())
