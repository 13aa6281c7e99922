import math

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")


def np_kdsvd(student_maps, teacher_maps, k=1):
    """RepDistiller's KDSVD, one sample at a time: SVD of each (HW x C) map, the teacher's first k right singular
    vectors, the student's best-aligned of its first k+3 with the teacher's sign, both scaled by the teacher's
    normalised singular values (the teacher's signed so that its entries sum to >= 0); RBF kernels between
    consecutive layers; squared differences summed, / B."""
    batch = student_maps[0].shape[0]
    total, previous = 0.0, None
    for fs, ft in zip(student_maps, teacher_maps):
        current = []
        for b in range(batch):
            _, s_t, vt_t = np.linalg.svd(ft[b].reshape(ft.shape[1], -1).T, full_matrices=False)
            _, _, vt_s = np.linalg.svd(fs[b].reshape(fs.shape[1], -1).T, full_matrices=False)
            v_t, candidates = vt_t[:k].T, vt_s[:k + 3].T
            v_t = v_t * np.where(v_t.sum(axis=0) < 0, -1.0, 1.0)  # the teacher's sign: entries summing to >= 0
            scale = s_t[:k] / np.linalg.norm(s_t[:k])
            v_s = np.zeros_like(v_t)
            for j in range(k):
                cos = candidates.T @ v_t[:, j]
                best = int(np.argmax(np.abs(cos)))
                v_s[:, j] = np.sign(cos[best]) * candidates[:, best]
            current.append((v_s * scale, v_t * scale))
        if previous is not None:
            for (v_s, v_t), (p_s, p_t) in zip(current, previous):
                for a in range(v_s.shape[0]):
                    for c in range(p_s.shape[0]):
                        for j in range(k):
                            k_s = math.exp(-(v_s[a, j] - p_s[c, j]) ** 2 / 8)
                            k_t = math.exp(-(v_t[a, j] - p_t[c, j]) ** 2 / 8)
                            total += (k_s - k_t) ** 2 / batch
        previous = current
    return total


SHAPES = {"a": (8, 4, 4), "b": (16, 2, 2), "c": (6, 3, 3)}


def make_kdsvd(student_shapes=SHAPES, teacher_shapes=SHAPES, components=1):
    from kd.losses.kdsvd import KDSVD
    torch.manual_seed(0)
    return KDSVD(weight=1.0, components=components, features=list(teacher_shapes),
                 feature_shapes={"student": student_shapes, "teacher": teacher_shapes})


def maps(generator, batch=2, shapes=SHAPES):
    return {name: torch.randn(batch, *shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize("components", [1, 2])
def test_kdsvd_against_a_per_sample_numpy_loop(components):
    loss = make_kdsvd(components=components)
    assert len(loss.connectors) == 0  # equal channels: the features are compared as they are
    g = torch.Generator().manual_seed(1)
    fs, ft = maps(g), maps(g)
    zs, y = torch.randn(2, 10, generator=g), torch.tensor([4, 1])
    expected = np_kdsvd([f.numpy() for f in fs.values()], [f.numpy() for f in ft.values()], components)
    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert expected > 0.01 and terms["svd"].item() == pytest.approx(expected, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + expected, rel=1e-8)


def test_invariant_to_positive_and_negative_scaling_and_zero_for_equal_maps():
    loss = make_kdsvd()
    g = torch.Generator().manual_seed(2)
    ft, zs, y = maps(g, batch=3), torch.randn(3, 10), torch.tensor([0, 1, 2])
    for factor in (1.0, 3.0, -1.0, 1e-3):
        scaled = {name: factor * f for name, f in ft.items()}
        _, terms = evaluate(loss, outputs(zs, **scaled), outputs(zs, **ft), y)
        assert terms["svd"].item() == pytest.approx(0, abs=1e-20)
    # K entries lie in (0, 1], so each layer pair contributes less than C_i * C_i-1 per sample
    other = maps(g, batch=3)
    value = evaluate(loss, outputs(zs, **other), outputs(zs, **ft), y)[1]["svd"].item()
    assert 0 < value < 16 * 8 + 6 * 16


def test_a_connector_maps_the_students_channels_where_they_differ():
    student = {"a": (5, 4, 4), "b": (16, 2, 2), "c": (4, 3, 3)}  # rank >= 4: no arbitrary null-space candidate
    loss = make_kdsvd(student_shapes=student).eval()
    assert sorted(loss.connectors) == ["a", "c"] and loss.connectors["a"][0].weight.shape == (8, 5, 1, 1)
    g = torch.Generator().manual_seed(3)
    fs, ft = maps(g, shapes=student), maps(g)
    bn = 1 / math.sqrt(1 + 1e-5)  # eval-mode BN, fresh running statistics
    mapped = {name: (np.einsum("oc,nchw->nohw", loss.connectors[name][0].weight.detach().numpy()[:, :, 0, 0],
                               f.numpy()) * bn if name in loss.connectors else f.numpy()) for name, f in fs.items()}
    expected = np_kdsvd(list(mapped.values()), [f.numpy() for f in ft.values()])
    zs, y = torch.zeros(2, 10), torch.tensor([0, 1])
    _, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert terms["svd"].item() == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("rows,cols", [(12, 5), (4, 9)])
def test_the_svd_backward_is_torchs_where_singular_values_are_distinct(rows, cols):
    from kd.losses.kdsvd import TopRightSingularVectors
    g = torch.Generator().manual_seed(4)
    m = torch.randn(3, rows, cols, generator=g)
    weights = torch.randn(3, cols, 3, generator=g)
    ours = m.clone().requires_grad_()
    (TopRightSingularVectors.apply(ours, 3)[0] * weights).sum().backward()
    theirs = m.clone().requires_grad_()
    (torch.linalg.svd(theirs, full_matrices=False)[2][:, :3].transpose(1, 2) * weights).sum().backward()
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-8, atol=1e-10)
    square = lambda x: TopRightSingularVectors.apply(x, 2)[0].pow(2)  # noqa: E731  (sign-free, for finite differences)
    assert torch.autograd.gradcheck(square, (m[:1].clone().requires_grad_(),))


def test_finite_gradients_for_repeated_and_zero_singular_values():
    from kd.losses.kdsvd import TopRightSingularVectors
    equal_rows = torch.zeros(1, 3, 6)
    equal_rows[0, 0, 0] = equal_rows[0, 1, 1] = equal_rows[0, 2, 2] = 1.0  # singular values 1, 1, 1; C > P
    rank_one = torch.ones(1, 8, 4)                                            # singular values 4, 0, 0, 0
    for m in (equal_rows, rank_one, torch.zeros(1, 4, 4)):
        m = m.clone().requires_grad_()
        (TopRightSingularVectors.apply(m, 4)[0] * torch.randn(1, m.shape[2], min(4, m.shape[1]))).sum().backward()
        assert torch.isfinite(m.grad).all()
    loss = make_kdsvd()
    fs = {name: torch.zeros(1, *shape, requires_grad=True) for name, shape in SHAPES.items()}
    ft = {name: torch.ones(1, *shape) for name, shape in SHAPES.items()}
    total, _ = evaluate(loss, outputs(torch.zeros(1, 10), **fs), outputs(torch.zeros(1, 10), **ft), torch.tensor([0]))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(f.grad).all() for f in fs.values())


def test_a_single_layer_or_a_vector_feature_is_refused():
    from kd.losses.kdsvd import KDSVD
    with pytest.raises(ValueError, match="at least two"):
        KDSVD(1.0, 1, ["a"], {"student": SHAPES, "teacher": SHAPES})
    shapes = {"a": (8, 4, 4), "embed": (8,)}
    with pytest.raises(ValueError, match="feature maps"):
        KDSVD(1.0, 1, ["a", "embed"], {"student": shapes, "teacher": shapes})
