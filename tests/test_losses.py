"""Each loss against a direct computation written independently (numpy, explicit loops), plus invariants."""
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from kd.losses import (PKT, RKD, AttentionTransfer, CrossEntropy, FitNet, FocalKD, HardLabelKD, InBatchCRD,
                       LogitMatching, VanillaKD)
from kd.taps import Outputs

pytestmark = pytest.mark.filterwarnings("ignore")
METHODS = ["ce", "kd", "cee", "fitnet", "at", "logit", "fkd", "rkd", "crd", "pkt"]
SHAPES = {"resnet18": (512, 4, 4), "resnet56": (64, 8, 8)}
STUDENT_SHAPE = (128, 4, 4)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z, y):
    return -np.mean(np_log_softmax(z)[np.arange(len(y)), y])


def smooth_l1(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b))
    return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def outputs(logits, feat=None):
    return Outputs(logits, {} if feat is None else {"feat": feat})


@pytest.fixture(autouse=True)
def float64_by_default():
    """Direct comparisons in float64; the robustness tests switch back to the training dtype, float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    y = torch.randint(10, (6,), generator=g)
    return zs, zt, y


# ---------------------------------------------------------------- direct computations

def test_ce(batch):
    zs, _, y = batch
    total, terms = CrossEntropy()(outputs(zs), None, y)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-10)


def test_vanilla_kd(batch):
    zs, zt, y = batch
    T, alpha = 4.0, 0.7
    ps, pt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    kl = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)])
    expected = alpha * T * T * kl + (1 - alpha) * np_ce(zs.numpy(), y.numpy())
    total, terms = VanillaKD(temperature=T, alpha=alpha)(outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert terms["kd"].item() == pytest.approx(T * T * kl, rel=1e-10)


def test_hard_label_kd(batch):
    zs, zt, y = batch
    expected = 0.7 * np_ce(zs.numpy(), zt.numpy().argmax(1)) + 0.3 * np_ce(zs.numpy(), y.numpy())
    total, _ = HardLabelKD(beta=0.7)(outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)


def test_logit_matching(batch):
    zs, zt, y = batch
    expected = np_ce(zs.numpy(), y.numpy()) + 1.5 * np.mean((zs.numpy() - zt.numpy()) ** 2)
    total, _ = LogitMatching(weight=1.5)(outputs(zs), outputs(zt), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)


def test_focal_kd(batch):
    zs, zt, y = batch
    T, gamma, lam = 4.0, 2.0, 1.0
    ps, pt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    fkd = np.mean([sum((1 - ps[i, c]) ** gamma * pt[i, c] * (math.log(pt[i, c]) - math.log(ps[i, c]))
                       for c in range(10)) for i in range(6)]) * T * T
    total, terms = FocalKD(temperature=T, gamma=gamma, weight=lam)(outputs(zs), outputs(zt), y)
    assert terms["fkd"].item() == pytest.approx(fkd, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + lam * fkd, rel=1e-10)


def test_attention_transfer_same_and_different_sizes(batch):
    zs, zt, y = batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def att(f, pool):
        a = (f.numpy() ** 2).mean(1)  # N, H, W
        if pool > 1:
            n, h, w = a.shape
            a = a.reshape(n, h // pool, pool, w // pool, pool).mean((2, 4))
        a = a.reshape(len(a), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = np_ce(zs.numpy(), y.numpy()) + 250 * np.mean((att(fs, 1) - att(ft, 2)) ** 2)
    total, _ = AttentionTransfer(weight=250.0)(outputs(zs, fs), outputs(zt, ft), y)
    assert total.item() == pytest.approx(expected, rel=1e-10)


def test_fitnet_against_direct_projection():
    torch.manual_seed(1)
    shapes = {"student": {"feat": (8, 4, 4)}, "teacher": {"feat": (6, 8, 8)}}
    loss = FitNet(weight=50.0, ramp_fraction=0.5, feature_shapes=shapes).eval()  # BN uses running stats
    fs, ft = torch.randn(3, 8, 4, 4), torch.rand(3, 6, 8, 8)
    zs, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    w = loss.projector[0].weight.detach().numpy()[:, :, 0, 0]  # (6, 8)
    proj = np.maximum(np.einsum("oc,nchw->nohw", w, fs.numpy()) / math.sqrt(1 + 1e-5), 0)
    proj = proj.repeat(2, axis=2).repeat(2, axis=3)  # adaptive average pooling 4x4 -> 8x8 replicates
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    hint = np.mean((unit(proj) - unit(ft.numpy())) ** 2)
    for epoch, num_epochs, factor in [(0, 10, 0.2), (2, 10, 0.6), (4, 10, 1.0), (9, 10, 1.0), (0, 1, 1.0)]:
        loss.start_epoch(epoch, num_epochs)
        total, terms = loss(outputs(zs, fs), outputs(zs, ft), y)
        assert terms["hint"].item() == pytest.approx(hint, rel=1e-8)
        assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 50 * factor * hint, rel=1e-8)


def _rkd_direct(s, t):
    def prep(x):
        x = x.numpy().mean((2, 3))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    s, t = prep(s), prep(t)
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    distance = smooth_l1(ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean())

    def cosines(x):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        a, b = x[j] - x[i], x[k] - x[i]
                        out.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        return np.array(out)

    return distance, smooth_l1(cosines(s), cosines(t))


def test_rkd_against_direct_loops(batch):
    zs, zt, y = batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    distance, angle = _rkd_direct(fs, ft)
    total, terms = RKD(distance_weight=25.0, angle_weight=50.0)(outputs(zs, fs), outputs(zt, ft), y)
    assert terms["distance"].item() == pytest.approx(distance, rel=1e-8)
    assert terms["angle"].item() == pytest.approx(angle, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 25 * distance + 50 * angle, rel=1e-8)


def test_rkd_angle_on_three_points_with_known_angles():
    # Teacher: (1,0), (0,1), (-1,0) on the unit circle: the angle at (0,1) is 90 degrees (Thales), the others 45.
    # Student: an equilateral triangle on the unit circle: every angle is 60 degrees.
    as_map = lambda pts: torch.tensor(pts).view(3, 2, 1, 1)  # noqa: E731
    teacher = as_map([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    student = as_map([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    # cosines per ordered triplet (i = vertex); each vertex appears twice (j,k and k,j)
    teacher_cos = [math.cos(math.pi / 4)] * 2 + [0.0] * 2 + [math.cos(math.pi / 4)] * 2
    student_cos = [0.5] * 6
    expected = smooth_l1(student_cos, teacher_cos)
    _, terms = RKD(1.0, 1.0)(outputs(torch.zeros(3, 10), student), outputs(torch.zeros(3, 10), teacher),
                             torch.zeros(3, dtype=torch.long))
    assert terms["angle"].item() == pytest.approx(expected, rel=1e-10)
    assert expected > 0.01


def test_crd_equals_cross_entropy_over_the_similarity_matrix(batch):
    zs, zt, y = batch
    torch.manual_seed(2)
    shapes = {"student": {"feat": (128, 4, 4)}, "teacher": {"feat": (64, 8, 8)}}
    loss = InBatchCRD(tau=0.07, weight=1.0, head_width=128, embed_dim=128, feature_shapes=shapes)
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def embed(head, f):
        lin1, lin2 = head[0], head[2]
        h = np.maximum(f.numpy().mean((2, 3)) @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy(), 0)
        e = h @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    sim = embed(loss.student_head, fs) @ embed(loss.teacher_head, ft).T / 0.07
    crd = np_ce(sim, np.arange(6))
    total, terms = loss(outputs(zs, fs), outputs(zt, ft), y)
    assert terms["crd"].item() == pytest.approx(crd, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + crd, rel=1e-8)


def test_pkt_against_direct_loops(batch):
    zs, zt, y = batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)

    def probs(f):
        x = f.numpy().mean((2, 3))
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        rows = []
        for i in range(len(x)):
            sims = np.array([x[i] @ x[j] for j in range(len(x)) if j != i]) / 0.1
            e = np.exp(sims - sims.max())
            rows.append(e / e.sum())
        return np.array(rows)

    ps, pt = probs(fs), probs(ft)
    pkt = np.mean(np.sum(pt * np.log(pt / ps), axis=1))
    total, terms = PKT(temperature=0.1, weight=2.0)(outputs(zs, fs), outputs(zt, ft), y)
    assert terms["pkt"].item() == pytest.approx(pkt, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 2 * pkt, rel=1e-8)


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("loss,term", [(VanillaKD(4.0, 0.7), "kd"), (FocalKD(4.0, 2.0, 1.0), "fkd"),
                                       (LogitMatching(1.0), "mse")])
def test_logit_terms_vanish_when_student_equals_teacher(batch, loss, term):
    zs, _, y = batch
    _, terms = loss(outputs(zs), outputs(zs.clone()), y)
    assert abs(terms[term].item()) < 1e-12


def test_at_vanishes_for_identical_maps_and_fitnet_distance_for_identical_normalised_maps(batch):
    zs, _, y = batch
    f = torch.randn(6, 64, 8, 8)
    _, terms = AttentionTransfer(250.0)(outputs(zs, f), outputs(zs, f.clone()), y)
    assert terms["at"].item() < 1e-14
    shapes = {"student": {"feat": (64, 8, 8)}, "teacher": {"feat": (64, 8, 8)}}
    fitnet = FitNet(50.0, 0.5, feature_shapes=shapes).eval()
    projected = fitnet.projector(f).detach()
    _, terms = fitnet(outputs(zs, f), outputs(zs, 3.0 * projected), y)  # same map up to scale: same after norm
    assert terms["hint"].item() < 1e-14


def test_relational_losses_are_invariant_to_feature_scale(batch):
    zs, zt, y = batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    for loss, names in [(RKD(25.0, 50.0), ("distance", "angle")), (PKT(0.1, 2.0), ("pkt",))]:
        _, base = loss(outputs(zs, fs), outputs(zt, ft), y)
        _, scaled = loss(outputs(zs, 7.5 * fs), outputs(zt, 0.01 * ft), y)
        for name in names:
            assert scaled[name].item() == pytest.approx(base[name].item(), rel=1e-8)
            assert base[name].item() > 0


# ---------------------------------------------------------------- gradients, robustness, all methods via config

def _build(method, teacher_shape, batch_size):
    cfg = compose_config([f"method={method}"])
    shapes = {"student": {"feat": STUDENT_SHAPE}, "teacher": {"feat": teacher_shape}}
    loss = instantiate(cfg.method.loss, feature_shapes=shapes)
    from kd.models import SmallNet
    student = SmallNet()
    return cfg, loss, student


def _student_outputs(student, x):
    feats = {}
    handle = student.stage3.register_forward_hook(lambda m, i, o: feats.__setitem__("feat", o))
    logits = student(x)
    handle.remove()
    return Outputs(logits, feats)


@pytest.mark.parametrize("teacher", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_student_and_loss_parts(method, teacher):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    _, loss, student = _build(method, SHAPES[teacher], 4)
    teacher_feat, teacher_logits = torch.randn(4, *SHAPES[teacher]), torch.randn(4, 10)
    total, terms = loss(_student_outputs(student, torch.randn(4, 3, 32, 32)),
                        Outputs(teacher_logits, {"feat": teacher_feat}), torch.tensor([0, 1, 2, 3]))
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for p in student.stage1.parameters())
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert "ce" in terms  # the teacher side is checked in test_trainer: it gets no gradient and stays frozen


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_finite_for_tiny_batches_and_extreme_logits(method, batch_size):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    for teacher_shape in SHAPES.values():
        _, loss, student = _build(method, teacher_shape, batch_size)
        images = torch.randn(batch_size, 3, 32, 32)
        teacher = Outputs(torch.randn(batch_size, 10) * 1e4, {"feat": torch.randn(batch_size, *teacher_shape)})
        labels = torch.arange(batch_size) % 10
        for scale in (1.0, 1e4):
            out = _student_outputs(student, images)
            student_out = Outputs(out.logits * scale, out.features)
            student.zero_grad()
            total, terms = loss(student_out, teacher, labels)
            total.backward()
            assert torch.isfinite(total), (method, batch_size, terms)
            assert all(torch.isfinite(v) for v in terms.values())
            for p in [*student.parameters(), *loss.parameters()]:
                assert p.grad is None or torch.isfinite(p.grad).all(), method
