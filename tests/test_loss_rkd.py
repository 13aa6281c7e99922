import math

import numpy as np
import pytest
import torch

from kd.losses.rkd import RKD
from reference import cross_entropy as np_ce, evaluate, outputs, smooth_l1

pytestmark = pytest.mark.usefixtures("float64")


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


def test_rkd_against_direct_loops(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    distance, angle = _rkd_direct(fs, ft)
    total, terms = evaluate(RKD(distance_weight=25.0, angle_weight=50.0, feature="feat"), outputs(zs, feat=fs),
                            outputs(zt, feat=ft), y)
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
    _, terms = evaluate(RKD(1.0, 1.0, "feat"), outputs(torch.zeros(3, 10), feat=student),
                        outputs(torch.zeros(3, 10), feat=teacher), torch.zeros(3, dtype=torch.long))
    assert terms["angle"].item() == pytest.approx(expected, rel=1e-10)
    assert expected > 0.01


def test_rkd_is_invariant_to_feature_scale(logits_batch):
    zs, zt, y = logits_batch
    fs, ft = torch.randn(6, 128, 4, 4), torch.randn(6, 64, 8, 8)
    loss = RKD(25.0, 50.0, "feat")
    _, base = evaluate(loss, outputs(zs, feat=fs), outputs(zt, feat=ft), y)
    _, scaled = evaluate(loss, outputs(zs, feat=7.5 * fs), outputs(zt, feat=0.01 * ft), y)
    for name in ("distance", "angle"):
        assert scaled[name].item() == pytest.approx(base[name].item(), rel=1e-8) and base[name].item() > 0
