import copy
import math

import numpy as np
import pytest
import torch

from kd.losses.crd_nce import ContrastiveRepresentationDistillation, sample_negatives
from reference import batch, cross_entropy as np_ce, evaluate, log_softmax, outputs, softmax

pytestmark = pytest.mark.usefixtures("float64")

N, LABELS = 20, torch.arange(20) % 4  # 20 training images, 5 per class: 15 of other classes for each
SHAPES = {"student": {"embed": (6,)}, "teacher": {"embed": (5,)}}


def _crd(nce_k=8, negatives="other_classes", kd_weight=0.0, seed=0):
    torch.manual_seed(seed)
    return ContrastiveRepresentationDistillation(
        weight=0.8, kd_weight=kd_weight, kd_temperature=4.0, feat_dim=4, nce_k=nce_k, nce_t=0.07, nce_m=0.5,
        negatives=negatives, feature="embed", feature_shapes=SHAPES, num_train=N, train_labels=LABELS)


def reference_negatives(anchors, k, other_classes):
    """Per anchor: the k eligible indices with the smallest of b x N uniform keys drawn now (a uniform draw without
    replacement), as a set; eligible = images of other classes, or every other image."""
    keys = torch.rand(len(anchors), N).numpy()
    rows = []
    for i, a in enumerate(anchors):
        eligible = [j for j in range(N) if (LABELS[j] != LABELS[a] if other_classes else j != a)]
        rows.append(sorted(sorted(eligible, key=lambda j: keys[i][j])[:k]))
    return rows


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(loss, fs, ft):
    head = lambda lin, x: unit(x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy())  # noqa: E731
    return head(loss.student_head, fs), head(loss.teacher_head, ft)


def reference_crd(v_s, v_t, bank_s, bank_t, anchors, negatives, z=None, t=0.07, eps=1e-7):
    """Tian et al.'s NCE objective on both sides with loops; Z = mean(e) * N unless given. Returns (crd, Z)."""
    k = len(negatives[0])
    e_s = np.array([[math.exp(v_s[n] @ bank_t[j] / t) for j in [a, *negatives[n]]] for n, a in enumerate(anchors)])
    e_t = np.array([[math.exp(v_t[n] @ bank_s[j] / t) for j in [a, *negatives[n]]] for n, a in enumerate(anchors)])
    z = (e_s.mean() * N, e_t.mean() * N) if z is None else z
    noise = k / N

    def side(p):
        positive = sum(math.log(row[0] / (row[0] + noise + eps)) for row in p)
        negative = sum(math.log(noise / (q + noise + eps)) for row in p for q in row[1:])
        return -(positive + negative) / len(p)

    return side(e_s / z[0]) + side(e_t / z[1]), z


def test_crd_nce_against_direct_computation_z_and_bank_updates(logits_batch):
    zs, zt, y = logits_batch
    loss = _crd()
    fs, ft = torch.randn(6, 6), torch.randn(6, 5)
    anchors = [3, 17, 8, 0, 12, 5]
    v_s, v_t = embeddings(loss, fs.numpy(), ft.numpy())
    bank_s, bank_t = loss.memory_student.numpy().copy(), loss.memory_teacher.numpy().copy()
    assert np.all(np.abs(bank_s) <= 1 / math.sqrt(4 / 3)) and (loss.z < 0).all()  # uniform start; Z not set yet

    state = torch.get_rng_state()
    negatives = reference_negatives(anchors, 8, other_classes=True)
    torch.set_rng_state(state)  # the loss draws the same keys
    crd, z = reference_crd(v_s, v_t, bank_s, bank_t, anchors, negatives)
    total, terms = evaluate(loss, outputs(zs, embed=fs), outputs(zt, embed=ft), y, indices=torch.tensor(anchors))
    assert terms["crd"].item() == pytest.approx(crd, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 0.8 * crd, rel=1e-10)
    assert loss.z.numpy() == pytest.approx(z, rel=1e-12)

    # each anchor's rows moved halfway to its new embedding and renormalised; every other row as it was
    untouched = [i for i in range(N) if i not in anchors]
    assert np.allclose(loss.memory_student.numpy()[anchors], unit(0.5 * bank_s[anchors] + 0.5 * v_s), atol=1e-14)
    assert np.allclose(loss.memory_teacher.numpy()[anchors], unit(0.5 * bank_t[anchors] + 0.5 * v_t), atol=1e-14)
    assert np.array_equal(loss.memory_student.numpy()[untouched], bank_s[untouched])

    # a second batch scores against the updated banks and keeps the first batch's Z
    bank_s, bank_t = loss.memory_student.numpy().copy(), loss.memory_teacher.numpy().copy()
    fs2, ft2 = torch.randn(6, 6), torch.randn(6, 5)
    anchors2 = [1, 3, 19, 4, 9, 6]
    v_s2, v_t2 = embeddings(loss, fs2.numpy(), ft2.numpy())
    state = torch.get_rng_state()
    negatives2 = reference_negatives(anchors2, 8, other_classes=True)
    torch.set_rng_state(state)
    crd2, _ = reference_crd(v_s2, v_t2, bank_s, bank_t, anchors2, negatives2, z=z)
    _, terms2 = evaluate(loss, outputs(zs, embed=fs2), outputs(zt, embed=ft2), y, indices=torch.tensor(anchors2))
    assert terms2["crd"].item() == pytest.approx(crd2, rel=1e-10)
    assert loss.z.numpy() == pytest.approx(z, rel=1e-12)


@pytest.mark.parametrize("negatives", ["other_classes", "all"])
def test_negatives_are_seeded_distinct_eligible_and_uniform(negatives):
    other = negatives == "other_classes"
    anchors = torch.tensor([0, 5, 19])
    torch.manual_seed(4)
    drawn = sample_negatives(anchors, LABELS if other else None, N, 6)
    torch.manual_seed(4)
    assert [sorted(row.tolist()) for row in drawn] == reference_negatives(anchors.tolist(), 6, other)
    for a, row in zip(anchors.tolist(), drawn.tolist()):
        assert len(set(row)) == 6 and a not in row
        assert all(LABELS[j] != LABELS[a] for j in row) or not other
    # 3000 draws for image 0: every eligible image appears with probability 6 / eligible
    counts = torch.bincount(sample_negatives(torch.zeros(3000, dtype=torch.long), LABELS if other else None, N, 6)
                            .flatten(), minlength=N).double()
    eligible = (LABELS != LABELS[0]) if other else (torch.arange(N) != 0)
    assert counts[~eligible].sum() == 0
    expected = 3000 * 6 / eligible.sum()
    assert ((counts[eligible] - expected).abs() < 5 * math.sqrt(expected)).all()


def test_nce_k_is_capped_by_the_eligible_images_and_the_run_says_so():
    assert _crd(nce_k=16384).k == 15 and _crd(nce_k=16384, negatives="all").k == 19 and _crd(nce_k=8).k == 8
    assert "15 negatives per image from the images of other classes (nce_k 16384 capped" in _crd(16384).scale_note()
    assert "capped" not in _crd(nce_k=8).scale_note()
    with pytest.raises(ValueError, match="not one of"):
        _crd(negatives="same_class")
    with pytest.raises(ValueError, match="other_classes 2 classes"):
        ContrastiveRepresentationDistillation(0.8, 0.0, 4.0, 4, 16, 0.07, 0.5, "other_classes", "embed", SHAPES,
                                              num_train=5, train_labels=torch.zeros(5, dtype=torch.long))


def test_heads_get_gradients_and_the_banks_none(logits_batch):
    zs, zt, y = logits_batch
    loss = _crd()
    parts = loss(outputs(zs, embed=torch.randn(6, 6, requires_grad=True)), outputs(zt, embed=torch.randn(6, 5)),
                 batch(y, torch.arange(6)))
    parts.total.backward()  # the in-forward bank update must leave the graph intact
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert not loss.memory_student.requires_grad and not loss.memory_teacher.requires_grad


def test_crd_nce_kd_adds_the_soft_target_term(logits_batch):
    zs, zt, y = logits_batch
    plain, with_kd = _crd(), _crd(kd_weight=1.0)
    fs, ft = torch.randn(6, 6), torch.randn(6, 5)
    state = torch.get_rng_state()
    _, terms = evaluate(plain, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    torch.set_rng_state(state)
    total, kd_terms = evaluate(with_kd, outputs(zs, embed=fs), outputs(zt, embed=ft), y)
    pt = softmax(zt.numpy() / 4)
    kd = 16 * np.mean(np.sum(pt * (np.log(pt) - log_softmax(zs.numpy() / 4)), axis=1))
    assert "kd" not in terms and kd_terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert kd_terms["crd"].item() == pytest.approx(terms["crd"].item(), rel=1e-12)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 0.8 * terms["crd"].item() + kd, rel=1e-10)


def test_resuming_from_a_state_dict_mid_training_gives_the_same_next_losses():
    g = torch.Generator().manual_seed(9)
    steps = [(torch.randn(5, 6, generator=g), torch.randn(5, 5, generator=g), torch.randn(5, 10, generator=g),
              torch.randperm(N, generator=g)[:5]) for _ in range(4)]

    def step(loss, optimizer, inputs):
        fs, ft, z, indices = inputs
        parts = loss(outputs(z, embed=fs), outputs(z, embed=ft), batch(LABELS[indices], indices))
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        return parts.terms["crd"].item()

    first = _crd(seed=0)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.5)  # stateless: the loss's state_dict is all there is
    for inputs in steps[:2]:
        step(first, optimizer, inputs)
    saved, rng = copy.deepcopy(first.state_dict()), torch.get_rng_state()
    assert {"memory_student", "memory_teacher", "z"} <= set(saved) and (saved["z"] > 0).all()
    expected = [step(first, optimizer, inputs) for inputs in steps[2:]]

    resumed = _crd(seed=1)
    assert not torch.equal(resumed.memory_student, saved["memory_student"])
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.5)
    assert [step(resumed, optimizer, inputs) for inputs in steps[2:]] == expected

    other_draws = _crd(seed=1)
    other_draws.load_state_dict(saved)
    optimizer = torch.optim.SGD(other_draws.parameters(), lr=0.5)
    assert [step(other_draws, optimizer, inputs) for inputs in steps[2:]] != expected  # the negatives are random
