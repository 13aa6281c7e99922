import numpy as np
import pytest
import torch

from preparation import Stage, connected, randomise_batchnorm
from reference import cross_entropy as np_ce, evaluate, outputs

FEATURES = ["stem", "stage1", "stage2"]


def _fsp(student_shapes, teacher_shapes, weight=2.0, features=FEATURES, **prepare):
    from kd.losses.fsp import FSP
    torch.manual_seed(1)
    args = {"prepare_epochs": 1, "prepare_lr": 0.05, "prepare_momentum": 0.9, "prepare_weight_decay": 5e-4, **prepare}
    return FSP(weight=weight, features=features, feature_shapes={"student": student_shapes, "teacher": teacher_shapes},
               **args)


def _block_mean(x, size):
    """Average over non-overlapping blocks down to size x size (adaptive pooling for exact multiples)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def _gram_loop(bottom, top):
    """G[n][a][c] = 1/(h w) sum_{h, w} top[n, a, h, w] * bottom[n, c, h, w], the larger map block-averaged first."""
    size = min(bottom.shape[2], top.shape[2])
    bottom, top = _block_mean(bottom, size), _block_mean(top, size)
    n, ca, cc = bottom.shape[0], top.shape[1], bottom.shape[1]
    g = np.zeros((n, ca, cc))
    for i in range(n):
        for a in range(ca):
            for c in range(cc):
                g[i, a, c] = sum(top[i, a, y, x] * bottom[i, c, y, x] for y in range(size) for x in range(size))
    return g / size**2


def _fsp_reference(student_maps, teacher_maps):
    return sum(np.mean((_gram_loop(s, s_next) - _gram_loop(t, t_next)) ** 2)
               for s, s_next, t, t_next in zip(student_maps, student_maps[1:], teacher_maps, teacher_maps[1:]))


@pytest.mark.usefixtures("float64")
def test_fsp_against_loops_with_pooling_and_a_connector():
    # stem 8x8 -> stage1 4x4 (pooled within the pair); the student's stage1 has 3 channels, the teacher's 4:
    # a 1x1 conv + BN connector (here with non-trivial statistics, eval mode) maps it.
    s_shapes = {"stem": (2, 8, 8), "stage1": (3, 4, 4), "stage2": (5, 2, 2)}
    t_shapes = {"stem": (2, 4, 4), "stage1": (4, 2, 2), "stage2": (5, 2, 2)}
    loss = _fsp(s_shapes, t_shapes)
    assert [type(c).__name__ for c in loss.connectors] == ["Identity", "Sequential", "Identity"]
    randomise_batchnorm(loss.connectors[1][1])
    g = torch.Generator().manual_seed(0)
    fs = {k: torch.randn(3, *v, generator=g) for k, v in s_shapes.items()}
    ft = {k: torch.randn(3, *v, generator=g) for k, v in t_shapes.items()}
    zs, y = torch.randn(3, 10, generator=g), torch.tensor([1, 2, 3])

    student_maps = [fs["stem"].numpy(), connected(loss.connectors[1], fs["stage1"].numpy()), fs["stage2"].numpy()]
    expected = _fsp_reference(student_maps, [ft[k].numpy() for k in FEATURES])

    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert terms["fsp"].item() == pytest.approx(expected, rel=1e-10)
    assert terms["ce"].item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-10)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()) + 2.0 * expected, rel=1e-10)
    loss.train()  # the trainer's train() each epoch leaves the fixed connectors in eval mode
    assert not loss.connectors[1][1].training
    _, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert terms["fsp"].item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_fsp_invariants(logits_batch):
    zs, _, y = logits_batch
    shapes = {"stem": (3, 8, 8), "stage1": (3, 4, 4), "stage2": (6, 2, 2)}
    loss = _fsp(shapes, shapes, weight=0.0)
    g = torch.Generator().manual_seed(2)
    fs = {k: torch.randn(6, *v, generator=g) for k, v in shapes.items()}
    ft = {k: torch.randn(6, *v, generator=g) for k, v in shapes.items()}
    total, terms = evaluate(loss, outputs(zs, **fs), outputs(zs, **fs), y)
    assert terms["fsp"].item() == 0.0 and total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()), rel=1e-12)
    base = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)[1]["fsp"].item()
    assert base > 0
    # weight 0 (RepDistiller's main stage): the total is the cross-entropy, the term is still logged
    total, _ = evaluate(loss, outputs(zs, **fs), outputs(zs, **ft), y)
    assert total.item() == pytest.approx(np_ce(zs.numpy(), y.numpy()))
    # every map of both networks scaled by a: each G scales by a^2, the loss by a^4
    times3 = lambda f: {k: 3 * v for k, v in f.items()}  # noqa: E731
    scaled = evaluate(loss, outputs(zs, **times3(fs)), outputs(zs, **times3(ft)), y)
    assert scaled[1]["fsp"].item() == pytest.approx(81 * base, rel=1e-10)
    # a mean over images: the batch repeated twice gives the same value
    twice = lambda f: {k: torch.cat([v, v]) for k, v in f.items()}  # noqa: E731
    doubled = evaluate(loss, outputs(torch.cat([zs, zs]), **twice(fs)), outputs(torch.cat([zs, zs]), **twice(ft)),
                       torch.cat([y, y]))
    assert doubled[1]["fsp"].item() == pytest.approx(base, rel=1e-10)
    # a channel permutation of one network's maps changes its FSP matrices, so the loss is not invariant to it
    permuted = {**fs, "stage1": fs["stage1"][:, [1, 2, 0]]}
    assert evaluate(loss, outputs(zs, **permuted), outputs(zs, **fs), y)[1]["fsp"].item() > 1e-3


def test_fsp_needs_two_features():
    with pytest.raises(ValueError, match=r"at least two consecutive features; got \['stem'\]"):
        _fsp({"stem": (2, 4, 4)}, {"stem": (2, 4, 4)}, features=["stem"])


@pytest.mark.parametrize("features,guided", [
    (["stem", "stage-3", "stage-2", "stage-1"], ("stage1", "stage2", "stage3")),   # the default: every stage
    (["stem", "stage1"], ("stage1",)),                                             # stage1 only
])
def test_fsp_preparation_trains_the_guided_layers_and_connectors_only(features, guided):
    stage = Stage(features)
    loss = _fsp(stage.shapes["student"], stage.shapes["teacher"], weight=0.0, features=features,
                prepare_epochs=2, prepare_lr=0.05)
    stage.check_guided_preparation(loss, guided, "fsp", epochs=2)
