import math

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")

BN_SCALE = 1 / math.sqrt(1 + 1e-5)  # an eval-mode BatchNorm with fresh running statistics and weight 1, bias 0


def np_pool(a, size):
    """Adaptive average pooling to size x size where size divides the map."""
    n, c, h, w = a.shape
    return a.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def np_hcl(fs, ft):
    """The authors' hcl for one level: full-resolution MSE, then for 4, 2, 1 below the map's size, halving weights."""
    loss, cnt, tot = np.mean((fs - ft) ** 2), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= fs.shape[2]:
            continue
        cnt /= 2
        loss += cnt * np.mean((np_pool(fs, size) - np_pool(ft, size)) ** 2)
        tot += cnt
    return loss / tot


def np_nearest(a, size):
    """torch's nearest interpolation: output index i reads input index floor(i * in / out)."""
    h, w = a.shape[2:]
    rows = [i * h // size[0] for i in range(size[0])]
    cols = [j * w // size[1] for j in range(size[1])]
    return a[:, :, rows][:, :, :, cols]


def np_conv3x3(x, w):
    """3x3 convolution, padding 1, no bias, by explicit loops over the kernel."""
    n, c, h, wd = x.shape
    padded = np.zeros((n, c, h + 2, wd + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + wd])
    return out


def np_abf(abf, x, residual, out_size):
    """One ABF (eval mode) in numpy, from its weights: reduce, fuse with attention, resize, output conv."""
    get = lambda t: t.detach().numpy()  # noqa: E731
    x = np.einsum("oc,nchw->nohw", get(abf.reduce[0].weight)[:, :, 0, 0], x) * BN_SCALE
    if residual is not None:
        residual = np_nearest(residual, x.shape[2:])
        both = np.concatenate([x, residual], axis=1)
        z = np.einsum("oc,nchw->nohw", get(abf.attention[0].weight)[:, :, 0, 0], both)
        z = 1 / (1 + np.exp(-(z + get(abf.attention[0].bias)[None, :, None, None])))
        x = x * z[:, :1] + residual * z[:, 1:]
    if x.shape[2:] != out_size:
        x = np_nearest(x, out_size)
    return np_conv3x3(x, get(abf.output[0].weight)) * BN_SCALE, x


STUDENT = {"s1": (4, 4, 4), "s2": (6, 2, 2), "emb": (8,)}
TEACHER = {"t1": (5, 8, 8), "t2": (3, 4, 4), "temb": (7,)}


def make_reviewkd(max_mid_channels=6):
    from kd.losses.reviewkd import ReviewKD
    torch.manual_seed(0)
    return ReviewKD(weight=1.0, warmup_fraction=20 / 240, max_mid_channels=max_mid_channels,
                    features=list(STUDENT), teacher_features=list(TEACHER),
                    feature_shapes={"student": STUDENT, "teacher": TEACHER})


def test_hcl_hand_values_and_invariants():
    from kd.losses.reviewkd import hierarchical_context_loss as hcl
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    assert hcl(ramp, torch.zeros_like(ramp)).item() == pytest.approx((77.5 + 73.25 / 2 + 56.25 / 4) / 1.75)
    assert hcl(ramp, torch.zeros_like(ramp)).item() == pytest.approx(73.25)
    assert hcl(torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(1.0)  # 1.875 / 1.875
    a = torch.randn(2, 3, 8, 8)
    assert hcl(a, a).item() == 0.0 and hcl(a + 0.3, a).item() == pytest.approx(0.09)  # constant d: d^2
    for size in (1, 2, 4, 8, 16):
        fs, ft = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
        assert hcl(fs, ft).item() == pytest.approx(np_hcl(fs.numpy(), ft.numpy()), rel=1e-12)


def test_reviewkd_against_a_numpy_chain_of_abfs():
    from kd.losses.batch import Progress
    loss = make_reviewkd().eval()  # BatchNorms on their running statistics: known scales
    assert [abf.reduce[0].out_channels for abf in loss.abfs] == [6, 6, 6]  # min(max_mid_channels 6, 8)
    assert loss.abfs[-1].attention is None and all(abf.attention is not None for abf in loss.abfs[:-1])
    with torch.no_grad():  # attention biases away from zero, so both fusion weights matter
        for abf in loss.abfs[:-1]:
            abf.attention[0].bias.copy_(torch.tensor([0.7, -0.4]))
    g = torch.Generator().manual_seed(3)
    fs = {name: torch.randn(3, *shape, generator=g) for name, shape in STUDENT.items()}
    ft = {name: torch.randn(3, *shape, generator=g) for name, shape in TEACHER.items()}
    zs, y = torch.randn(3, 10, generator=g), torch.tensor([2, 5, 7])

    s1, s2, emb = fs["s1"].numpy(), fs["s2"].numpy(), fs["emb"].numpy()[:, :, None, None]
    out3, res = np_abf(loss.abfs[2], emb, None, (1, 1))
    out2, res = np_abf(loss.abfs[1], s2, res, (4, 4))
    out1, _ = np_abf(loss.abfs[0], s1, res, (8, 8))
    targets = [ft["t1"].numpy(), ft["t2"].numpy(), ft["temb"].numpy()[:, :, None, None]]
    hcl = sum(np_hcl(o, t) for o, t in zip([out1, out2, out3], targets))
    # warm-up over 20/240 of the run: 24 epochs -> 2 epochs, counted per step
    for epoch, step, steps, epochs, factor in [(0, 4, 5, 24, 0.5), (0, 0, 5, 24, 0.1), (1, 4, 5, 24, 1.0),
                                               (5, 2, 5, 24, 1.0), (0, 1, 5, 240, 0.4 / 20), (9, 4, 5, 240, 0.5)]:
        total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y,
                                progress=Progress(epoch, step, steps, epochs))
        assert terms["hcl"].item() == pytest.approx(hcl, rel=1e-10)
        assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + factor * hcl, rel=1e-10)


def test_outputs_take_the_teachers_shapes_and_a_batch_of_one_trains():
    loss = make_reviewkd(max_mid_channels=512)  # mid = the student's deepest channels, 8
    assert [abf.reduce[0].out_channels for abf in loss.abfs] == [8, 8, 8]
    assert [abf.output[0].out_channels for abf in loss.abfs] == [5, 3, 7] and loss.out_sizes == [(8, 8), (4, 4), (1, 1)]
    for batch_size in (1, 2):
        fs = {name: torch.randn(batch_size, *shape) for name, shape in STUDENT.items()}
        ft = {name: torch.randn(batch_size, *shape) for name, shape in TEACHER.items()}
        total, _ = evaluate(loss, outputs(torch.randn(batch_size, 10), **fs),
                                outputs(torch.randn(batch_size, 10), **ft), torch.zeros(batch_size, dtype=torch.long))
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(p.grad).all() for p in loss.parameters())


def test_unpaired_or_untapped_levels_are_refused():
    from kd.losses.reviewkd import ReviewKD
    shapes = {"student": STUDENT, "teacher": TEACHER}
    with pytest.raises(ValueError, match="same length"):
        ReviewKD(1.0, 0.1, 512, ["s1", "s2", "emb"], ["t1", "temb"], shapes)
    with pytest.raises(ValueError, match=r"the teacher has no tapped feature 'stage-1_preact'.*method.taps"):
        ReviewKD(1.0, 0.1, 512, ["s1", "s2", "emb"], ["t1", "stage-1_preact", "temb"], shapes)
