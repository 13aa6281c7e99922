import pytest
import torch

from preparation import Stage, connected, randomise_batchnorm
from reference import cross_entropy as np_ce, evaluate, outputs

FEATURES = ["stage1_preact", "stage2_preact", "stage3_preact"]


def _ab(student_shapes, teacher_shapes, weight=2.0, features=FEATURES, **prepare):
    from kd.losses.ab import ActivationBoundaries
    torch.manual_seed(1)
    args = {"prepare_epochs": 1, "prepare_lr": 0.05, "prepare_momentum": 0.9, "prepare_weight_decay": 5e-4, **prepare}
    return ActivationBoundaries(margin=1.0, weight=weight, features=features,
                                feature_shapes={"student": student_shapes, "teacher": teacher_shapes}, **args)


def _error_loop(s, t, margin=1.0):
    """The paper's alternative L2 per element: (s+m)^2 where the teacher neuron is off and s > -m, (s-m)^2 where it
    is on and s < m, summed."""
    total = 0.0
    for sv, tv in zip(s.ravel(), t.ravel()):
        if tv > 0:
            total += max(0.0, margin - sv) ** 2
        else:
            total += max(0.0, margin + sv) ** 2
    return total


def _block_mean(x, size):
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


@pytest.mark.usefixtures("float64")
def test_ab_hand_checked_elements():
    # (s, t) -> error with m = 1: (-2,-1) 0, (-0.5,-1) 0.25, (0.5,1) 0.25, (2,1) 0, (0.5,-1) 2.25, (-0.5,1) 2.25,
    # and at the margins (1, 1) 0, (-1, -1) 0, (0, 0) 1 (t = 0 counts as off)
    s = torch.tensor([-2, -0.5, 0.5, 2, 0.5, -0.5, 1, -1, 0.0]).view(1, 1, 1, 9)
    t = torch.tensor([-1, -1, 1, 1, -1, 1, 1, -1, 0.0]).view(1, 1, 1, 9)
    loss = _ab({"pre": (1, 1, 9)}, {"pre": (1, 1, 9)}, features=["pre"])
    zs, y = torch.zeros(1, 10), torch.tensor([0])
    _, terms = evaluate(loss, outputs(zs, pre=s), outputs(zs, pre=t), y)
    assert terms["ab"].item() == pytest.approx(3 / 1000 * (0.25 + 0.25 + 2.25 + 2.25 + 1), rel=1e-12)


@pytest.mark.usefixtures("float64")
def test_ab_against_loops_with_layer_weights_connectors_and_pooling():
    # stage1: student 8x8 vs teacher 4x4 (the student's map pooled, then its connector 3 -> 4 channels);
    # stage2: same shapes (identity); stage3: student 2x2 vs teacher 4x4 (the teacher's pre-activations pooled)
    s_shapes = {"stage1_preact": (3, 8, 8), "stage2_preact": (5, 4, 4), "stage3_preact": (2, 2, 2)}
    t_shapes = {"stage1_preact": (4, 4, 4), "stage2_preact": (5, 4, 4), "stage3_preact": (6, 4, 4)}
    loss = _ab(s_shapes, t_shapes)
    assert [type(c).__name__ for c in loss.connectors] == ["Sequential", "Identity", "Sequential"]
    randomise_batchnorm(loss.connectors[0][1]), randomise_batchnorm(loss.connectors[2][1])
    g = torch.Generator().manual_seed(0)
    fs = {k: 2 * torch.randn(3, *v, generator=g) for k, v in s_shapes.items()}
    ft = {k: torch.randn(3, *v, generator=g) for k, v in t_shapes.items()}
    zs, y = torch.randn(3, 10, generator=g), torch.tensor([4, 5, 6])

    layers = [(connected(loss.connectors[0], _block_mean(fs["stage1_preact"].numpy(), 4)), ft["stage1_preact"].numpy()),
              (fs["stage2_preact"].numpy(), ft["stage2_preact"].numpy()),
              (connected(loss.connectors[2], fs["stage3_preact"].numpy()), _block_mean(ft["stage3_preact"].numpy(), 2))]
    expected = sum(w * _error_loop(s, t) for w, (s, t) in zip([0.25, 0.5, 1.0], layers)) / 3 * 3 / 1000

    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert terms["ab"].item() == pytest.approx(expected, rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 2.0 * expected, rel=1e-10)
    loss.train()  # the trainer's train() each epoch leaves the fixed connectors in eval mode
    assert evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)[1]["ab"].item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_ab_invariants(logits_batch):
    zs, _, y = logits_batch
    shapes = {f: (4, 4, 4) for f in FEATURES}
    loss = _ab(shapes, shapes, weight=0.0)
    g = torch.Generator().manual_seed(3)
    fs = {k: torch.randn(6, *v, generator=g) for k, v in shapes.items()}
    ft = {k: torch.randn(6, *v, generator=g) for k, v in shapes.items()}
    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    base = terms["ab"].item()
    assert base > 0 and total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()))  # weight 0: plain CE
    # only the sign of the teacher's pre-activation matters
    assert evaluate(loss, outputs(zs, **fs), outputs(zs, **{k: 7 * v for k, v in ft.items()}), y)[1]["ab"].item() == \
        pytest.approx(base, rel=1e-12)
    # zero once every student neuron is on the teacher's side of zero by at least the margin
    beyond = {k: torch.where(v > 0, 1 + torch.rand_like(v), -1 - torch.rand_like(v)) for k, v in ft.items()}
    assert evaluate(loss, outputs(zs, **beyond), outputs(zs, **ft), y)[1]["ab"].item() == 0.0
    # divided by the batch size: the batch repeated twice gives the same value
    twice = lambda f: {k: torch.cat([v, v]) for k, v in f.items()}  # noqa: E731
    doubled = evaluate(loss, outputs(torch.cat([zs, zs]), **twice(fs)), outputs(torch.cat([zs, zs]), **twice(ft)),
                       torch.cat([y, y]))
    assert doubled[1]["ab"].item() == pytest.approx(base, rel=1e-12)
    # the deepest layer weighs 1, the one before 1/2, the first 1/4
    assert loss.layer_weights == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("features,guided", [
    (["stage-3_preact", "stage-2_preact", "stage-1_preact"], ("stage1", "stage2", "stage3")),  # the default
    (["stage1_preact", "stage2_preact"], ("stage1", "stage2")),  # stage3 is not guided: it stays as it was
])
def test_ab_preparation_trains_the_guided_layers_and_connectors_only(features, guided):
    stage = Stage(features)
    loss = _ab(stage.shapes["student"], stage.shapes["teacher"], weight=0.0, features=features, prepare_epochs=2)
    stage.check_guided_preparation(loss, guided, "ab", epochs=2)
