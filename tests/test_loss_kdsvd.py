import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import cross_entropy as np_ce, evaluate, outputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "kdsvd_reference.json"


def np_kdsvd(student_maps, teacher_maps, k=1, teacher_negative=None):
    """RepDistiller's KDSVD, one sample at a time: SVD of each (HW x C) map, the teacher's first k right singular
    vectors, the student's best-aligned of its first k+3 with the teacher's sign, both scaled by the teacher's
    normalised singular values; RBF kernels between consecutive layers; squared differences summed, / B.
    The teacher's vectors are signed so that their entries sum to >= 0, or, given `teacher_negative` (per layer,
    (B, k) booleans), to the sign another SVD returned (numpy's LAPACK may sign them otherwise than torch's)."""
    batch = student_maps[0].shape[0]
    total, previous = 0.0, None
    for layer, (fs, ft) in enumerate(zip(student_maps, teacher_maps)):
        current = []
        for b in range(batch):
            _, s_t, vt_t = np.linalg.svd(ft[b].reshape(ft.shape[1], -1).T, full_matrices=False)
            _, _, vt_s = np.linalg.svd(fs[b].reshape(fs.shape[1], -1).T, full_matrices=False)
            v_t, candidates = vt_t[:k].T, vt_s[:k + 3].T
            v_t = v_t * np.where(v_t.sum(axis=0) < 0, -1.0, 1.0)
            if teacher_negative is not None:
                v_t = v_t * np.where(teacher_negative[layer][b], -1.0, 1.0)
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


def torch_svd_sign_negative(feature_maps, k=1):
    """Per layer, (B, k): whether torch's SVD returns each of the first k right singular vectors with a negative sum."""
    return [(torch.linalg.svd(f.flatten(2).transpose(1, 2), full_matrices=False)[2][:, :k].sum(2) < 0).numpy()
            for f in feature_maps.values()]


def make_kdsvd(student_shapes=SHAPES, teacher_shapes=SHAPES, components=1, teacher_sign="nonnegative_sum"):
    from kd.losses.kdsvd import KDSVD
    torch.manual_seed(0)
    return KDSVD(weight=1.0, components=components, features=list(teacher_shapes), teacher_sign=teacher_sign,
                 feature_shapes={"student": student_shapes, "teacher": teacher_shapes})


def maps(generator, batch=2, shapes=SHAPES):
    return {name: torch.randn(batch, *shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize("teacher_sign", ["nonnegative_sum", "svd"])
@pytest.mark.parametrize("components", [1, 2])
def test_kdsvd_against_a_per_sample_numpy_loop(components, teacher_sign):
    loss = make_kdsvd(components=components, teacher_sign=teacher_sign)
    assert len(loss.connectors) == 0  # equal channels: the features are compared as they are
    g = torch.Generator().manual_seed(1)
    fs, ft = maps(g), maps(g)
    zs, y = torch.randn(2, 10, generator=g), torch.tensor([4, 1])
    negative = None if teacher_sign == "nonnegative_sum" else torch_svd_sign_negative(ft, components)
    expected = np_kdsvd([f.numpy() for f in fs.values()], [f.numpy() for f in ft.values()], components, negative)
    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert expected > 0.01 and terms["svd"].item() == pytest.approx(expected, rel=1e-8)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + expected, rel=1e-8)


def fixture_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    make = lambda: {name: torch.randn(recipe["batch"], *recipe["shapes"][name], generator=g,  # noqa: E731
                                      dtype=torch.float64).clamp_min(0) for name in recipe["layers"]}
    fs, ft = make(), make()
    for maps_, sums in ((fs, recipe["check"]["student_sums"]), (ft, recipe["check"]["teacher_sums"])):
        assert [f.sum().item() for f in maps_.values()] == pytest.approx(sums, rel=1e-12)
    return fs, ft


def svd_term_and_gradient(loss, fs, ft):
    fs = {name: f.clone().requires_grad_() for name, f in fs.items()}
    zeros, y = torch.zeros(len(ft["a"]), 10), torch.zeros(len(ft["a"]), dtype=torch.long)
    _, terms = evaluate(loss, outputs(zeros, **fs), outputs(zeros, **ft), y)
    terms["svd"].backward()
    return terms["svd"].item(), torch.cat([f.grad.flatten() for f in fs.values()]).numpy()


def test_teacher_sign_svd_matches_repdistillers_kdsvd():
    """Fixture: RepDistiller's KDSVD(k=1) on seeded post-ReLU-like maps whose teacher vectors LAPACK returns with
    alternating signs from layer to layer (negative, positive, negative sums)."""
    reference = json.loads(FIXTURE.read_text())
    recipe = reference["inputs"]
    fs, ft = fixture_inputs(recipe)
    negative = [layer[:, 0].tolist() for layer in torch_svd_sign_negative(ft)]
    if negative != recipe["teacher_svd_sign_negative"]:
        pytest.skip(f"this LAPACK returns other singular-vector signs ({negative}) than the one the fixture was made "
                    f"with ({recipe['teacher_svd_sign_negative']}); RepDistiller's value depends on them")
    shapes = {name: tuple(shape) for name, shape in recipe["shapes"].items()}
    expected_gradient = np.array(reference["gradient_wrt_student"])
    value, gradient = svd_term_and_gradient(make_kdsvd(shapes, shapes, teacher_sign="svd"), fs, ft)
    assert value == pytest.approx(reference["value"], rel=1e-10)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-8, atol=1e-10 * np.abs(expected_gradient).max())
    # the default sign convention: here 92% below RepDistiller's value, the gradient 88% off
    value, gradient = svd_term_and_gradient(make_kdsvd(shapes, shapes, teacher_sign="nonnegative_sum"), fs, ft)
    assert value == pytest.approx(0.0836 * reference["value"], rel=1e-2)
    assert np.linalg.norm(gradient - expected_gradient) > 0.85 * np.linalg.norm(expected_gradient)


def test_the_sign_conventions_agree_where_consecutive_layers_get_the_same_sign():
    """The kernels compare a layer's vector with the previous layer's: flipping both changes nothing, so the two
    conventions differ only for a sample whose teacher vectors the SVD signs differently from layer to layer."""
    reference = json.loads(FIXTURE.read_text())
    recipe = reference["inputs"]
    fs, ft = fixture_inputs(recipe)
    shapes = {name: tuple(shape) for name, shape in recipe["shapes"].items()}
    kept = {"a": ft["a"], "c": ft["c"]}  # both negative for every sample: the pair (a, c) alone agrees
    fs_kept = {"a": fs["a"], "c": fs["c"]}
    both = [svd_term_and_gradient(make_kdsvd({k: shapes[k] for k in kept}, {k: shapes[k] for k in kept},
                                             teacher_sign=sign), fs_kept, kept) for sign in ("nonnegative_sum", "svd")]
    assert both[0][0] == pytest.approx(both[1][0], rel=1e-12) and both[0][0] > 1e-3
    np.testing.assert_allclose(both[0][1], both[1][1], rtol=1e-10, atol=1e-14)


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
        KDSVD(1.0, 1, ["a"], "svd", {"student": SHAPES, "teacher": SHAPES})
    shapes = {"a": (8, 4, 4), "embed": (8,)}
    with pytest.raises(ValueError, match="feature maps"):
        KDSVD(1.0, 1, ["a", "embed"], "svd", {"student": shapes, "teacher": shapes})
    with pytest.raises(ValueError, match=r"teacher_sign 'positive' is not one of \['nonnegative_sum', 'svd'\]"):
        KDSVD(1.0, 1, ["a", "b"], "positive", {"student": SHAPES, "teacher": SHAPES})
