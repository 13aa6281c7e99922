import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def np_margin(gamma, beta):
    """E[x | x < 0] for x ~ N(beta, gamma^2) from the closed form, -3|gamma| where P(x < 0) <= 1e-3."""
    std = abs(gamma)
    cdf = 0.5 * math.erfc((beta / std) / math.sqrt(2))  # P(x < 0) = Phi(-beta/std)
    if cdf <= 1e-3:
        return -3 * std
    return beta - std * math.exp(-((beta / std) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf


def np_partial_l2(s, t, m):
    """The authors' element loss, one element at a time: the teacher clipped from below at the margin, then the
    squared difference where the student is above it or the teacher is positive."""
    total = 0.0
    for s_, t_, m_ in zip(s.ravel(), t.ravel(), np.broadcast_to(m, s.shape).ravel()):
        t_ = max(t_, m_)
        if s_ > t_ or t_ > 0:
            total += (s_ - t_) ** 2
    return total


def taps(model, features=None):
    """The model's taps; with `features`, what the harness hands the loss: each feature name -> its tap spec."""
    from kd.taps import resolve
    every = dict(OmegaConf.load(CONF / "model" / f"{model}.yaml").taps)
    return every if features is None else {name: resolve(name, every, model) for name in features}


def teacher_with_bns(gammas_betas):
    """A ResNet-20 whose three stage-end BatchNorms (layerK.2.bn2) carry the given weights and biases."""
    from kd.models import resnet20
    model = resnet20().eval()
    for k, (gamma, beta) in enumerate(gammas_betas, start=1):
        bn = model.get_submodule(f"layer{k}.2.bn2")
        with torch.no_grad():
            bn.weight.copy_(torch.as_tensor(gamma, dtype=torch.float64))
            bn.bias.copy_(torch.as_tensor(beta, dtype=torch.float64))
    return model


FEATURES = ["stage1_preact", "stage2_preact", "stage3_preact"]


def make_ofd(student_shapes, teacher_shapes, teacher_model, features=FEATURES):
    from kd.losses.ofd import OFD
    torch.manual_seed(0)
    shapes = {"student": dict(zip(features, student_shapes)), "teacher": dict(zip(features, teacher_shapes))}
    return OFD(weight=1e-3, features=features, teacher_taps=taps("resnet20", features), feature_shapes=shapes,
               teacher_model=teacher_model)


def test_margins_are_the_negative_gaussian_means_of_the_teachers_stage_end_batchnorms():
    cases = [(1.0, 0.0, -0.7978846), (2.0, 1.0, -1.2821555), (-1.0, 5.0, -3.0), (0.5, -1.0, -1.0276239)]
    for gamma, beta, expected in cases:
        assert np_margin(gamma, beta) == pytest.approx(expected, abs=1e-6)
    rng = np.random.default_rng(0)
    params = [(rng.uniform(-2, 2, c), rng.uniform(-3, 3, c)) for c in (16, 32, 64)]
    params[0][0][:4], params[0][1][:4] = [c[0] for c in cases], [c[1] for c in cases]
    ofd = make_ofd([(8, 4, 4)] * 3, [(16, 4, 4), (32, 4, 4), (64, 4, 4)], teacher_with_bns(params))
    for i, (gammas, betas) in enumerate(params):
        margin = getattr(ofd, f"margin{i}")
        assert margin.shape == (1, len(gammas), 1, 1)
        np.testing.assert_allclose(margin.flatten().numpy(), [np_margin(g, b) for g, b in zip(gammas, betas)],
                                   rtol=1e-10)
        assert (margin.flatten().numpy() <= np.minimum(0, betas) + 1e-12).all()  # m <= min(0, beta)
    np.testing.assert_allclose(ofd.margin0.flatten()[:4].numpy(), [c[2] for c in cases], atol=1e-6)


def test_margin_against_monte_carlo():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, 2_000_000)
    assert np_margin(2.0, 1.0) == pytest.approx(x[x < 0].mean(), abs=5e-3)
    from kd.losses.ofd import gaussian_margin
    got = gaussian_margin(torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, -0.5, 0.5]))
    np.testing.assert_allclose(got.numpy(), [np_margin(2.0, 1.0), -0.5, 0.0], rtol=1e-12)  # gamma 0: the limits


def test_partial_l2_hand_values():
    # (s, t) -> element loss with margin -0.8, from the notes' hand computation
    for s, t, expected in [(0, -3, 0.64), (-2, -3, 0.0), (-0.5, -0.2, 0.0), (1, 0.5, 0.25), (-1, 0.5, 2.25)]:
        assert np_partial_l2(np.array([s]), np.array([t]), -0.8) == pytest.approx(expected)


def _identity_connectors(ofd):
    """Connectors set to the identity up to BN's eval scale 1/sqrt(1 + eps), so the student's features are known."""
    ofd.eval()
    for conn in ofd.connectors:
        with torch.no_grad():
            conv = conn[0].weight
            conv.zero_()
            conv[:, :, 0, 0] += torch.eye(conv.shape[0], conv.shape[1])
    return 1 / math.sqrt(1 + 1e-5)


def test_ofd_against_a_loop_over_stages_and_elements_with_pooling():
    rng = np.random.default_rng(2)
    params = [(rng.uniform(0.2, 2, c), rng.uniform(-2, 2, c)) for c in (16, 32, 64)]
    student_shapes = [(16, 4, 4), (32, 2, 2), (64, 4, 4)]   # stage 3: the student's map is the larger one
    teacher_shapes = [(16, 8, 8), (32, 2, 2), (64, 2, 2)]   # stage 1: the teacher's map is the larger one
    ofd = make_ofd(student_shapes, teacher_shapes, teacher_with_bns(params))
    scale = _identity_connectors(ofd)
    fs = [torch.randn(3, *shape) for shape in student_shapes]
    ft = [torch.randn(3, *shape) * 2 for shape in teacher_shapes]
    zs, y = torch.randn(3, 10), torch.tensor([0, 4, 9])

    def np_pool(a, k):  # average over k x k blocks
        n, c, h, w = a.shape
        return a.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
    students = [fs[0].numpy() * scale, fs[1].numpy() * scale, np_pool(fs[2].numpy() * scale, 2)]
    teachers = [np_pool(ft[0].numpy(), 2), ft[1].numpy(), ft[2].numpy()]
    expected = 0.0
    for i, (s, t, (gammas, betas)) in enumerate(zip(students, teachers, params)):
        m = np.array([np_margin(g, b) for g, b in zip(gammas, betas)]).reshape(1, -1, 1, 1)
        expected += np_partial_l2(s, t, m) / 3 / 2 ** (2 - i)

    total, terms = evaluate(ofd, outputs(zs, **dict(zip(FEATURES, fs))), outputs(zs, **dict(zip(FEATURES, ft))), y)
    assert terms["ofd"].item() == pytest.approx(expected, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 1e-3 * expected, rel=1e-10)


def test_zero_for_equal_features_and_for_a_student_below_the_clipped_teacher():
    ofd = make_ofd([(16, 4, 4), (32, 4, 4), (64, 4, 4)], [(16, 4, 4), (32, 4, 4), (64, 4, 4)],
                   teacher_with_bns([(torch.ones(c), torch.zeros(c)) for c in (16, 32, 64)]))
    scale = _identity_connectors(ofd)
    zs, y = torch.randn(2, 10), torch.tensor([1, 2])
    ft = {name: torch.randn(2, c, 4, 4) for name, c in zip(FEATURES, (16, 32, 64))}
    same = {name: f / scale for name, f in ft.items()}
    assert evaluate(ofd, outputs(zs, **same), outputs(zs, **ft), y)[1]["ofd"].item() == pytest.approx(0, abs=1e-20)
    negative = {name: -f.abs() for name, f in ft.items()}  # where the teacher is <= 0, a student below
    below = {name: torch.minimum(f, torch.full_like(f, -0.8)) / scale - 0.5 for name, f in negative.items()}
    assert evaluate(ofd, outputs(zs, **below), outputs(zs, **negative), y)[1]["ofd"].item() == 0.0  # max(t, m) costs 0
    # teacher values below the margin (-0.798) are all the same to the loss
    deeper = {name: torch.where(f < -0.8, f - 5.0, f) for name, f in ft.items()}
    fs = {name: torch.randn_like(f) for name, f in ft.items()}
    assert evaluate(ofd, outputs(zs, **fs), outputs(zs, **deeper), y)[1]["ofd"].item() == pytest.approx(
        evaluate(ofd, outputs(zs, **fs), outputs(zs, **ft), y)[1]["ofd"].item(), rel=1e-12)


def test_the_batchnorm_is_found_from_the_tap_for_each_architecture():
    from kd.losses.ofd import batchnorm_before
    from kd.models import ResNet18, SmallNet, resnet56
    expected = {"resnet18": (ResNet18(), ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"]),
                "resnet56": (resnet56(), ["layer1.8.bn2", "layer2.8.bn2", "layer3.8.bn2"]),
                "smallnet": (SmallNet(), ["stage1.4", "stage2.4", "stage3.1"])}
    for arch, (model, paths) in expected.items():
        for k, path in enumerate(paths, start=1):
            assert batchnorm_before(model, taps(arch)[f"stage{k}_preact"]) is model.get_submodule(path), (arch, k)


def test_a_four_stage_teachers_margins_follow_the_paired_stages_and_survive_batchnorm_folding():
    from kd.batchnorm_folding import fold_batchnorm
    from kd.losses.ofd import OFD
    from kd.models import ResNet18
    teacher = ResNet18().eval()
    for k, width in enumerate((64, 128, 256, 512), start=1):
        with torch.no_grad():
            teacher.get_submodule(f"layer{k}.1.bn2").bias.fill_(-float(k))
    features = ["stage-3_preact", "stage-2_preact", "stage-1_preact"]
    shapes = {"student": dict(zip(features, [(32, 16, 16), (64, 8, 8), (128, 4, 4)])),
              "teacher": dict(zip(features, [(128, 16, 16), (256, 8, 8), (512, 4, 4)]))}
    ofd = OFD(1e-3, features, taps("resnet18", features), shapes, teacher)
    margins = [getattr(ofd, f"margin{i}").clone() for i in range(3)]
    for i, k in enumerate((2, 3, 4)):  # stage-3 of ResNet-18 is stage2: its bias -2 sets the margin
        assert margins[i].shape == (1, shapes["teacher"][features[i]][0], 1, 1)
        assert margins[i].flatten()[0].item() == pytest.approx(np_margin(1.0, -float(k)), rel=1e-10)
    assert fold_batchnorm(teacher) > 0
    assert all(torch.equal(getattr(ofd, f"margin{i}"), margins[i]) for i in range(3))


def test_features_without_a_batchnorm_or_with_sizes_that_do_not_divide_are_refused():
    from kd.models import resnet20
    with pytest.raises(ValueError, match="not a pre-activation"):
        make_ofd([(16, 8, 8)], [(16, 8, 8)], resnet20(), features=["stage1"])
    with pytest.raises(ValueError, match="6x6 in the student and 8x8 in the teacher"):
        make_ofd([(16, 6, 6)], [(16, 8, 8)], resnet20(), features=["stage1_preact"])
    from kd.losses.ofd import OFD
    shapes = {"student": {"stage1_preact": (16, 8, 8)}, "teacher": {"stage1_preact": (16, 8, 8)}}
    with pytest.raises(ValueError, match="no affine BatchNorm2d with 16 channels"):
        OFD(1e-3, ["stage1_preact"], {"stage1_preact": "layer1.2.conv1:input"}, shapes, resnet20())


def test_scale_note_names_the_stage_weights():
    ofd = make_ofd([(8, 4, 4)] * 3, [(16, 4, 4), (32, 4, 4), (64, 4, 4)],
                   teacher_with_bns([(torch.ones(c), torch.zeros(c)) for c in (16, 32, 64)]))
    assert "stage1_preact x0.25, stage2_preact x0.5, stage3_preact x1" in ofd.scale_note()
