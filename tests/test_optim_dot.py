"""DOT (kd/optim/dot.py): SGD when delta = 0 or on a plain backward, the authors' update equations otherwise, a
resumable state, and a real `train.py optim=dot` run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_config, run_train
from kd.optim.dot import DOT

pytestmark = pytest.mark.usefixtures("float64")
LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def tiny_problem(seed=0):
    """A linear classifier whose weight and bias get both gradients: task = CE, distillation = MSE to targets."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
        model.bias.copy_(torch.randn(3, generator=g))
    data = [(torch.randn(5, 4, generator=g), torch.randint(3, (5,), generator=g), torch.randn(5, 3, generator=g))
            for _ in range(6)]
    return model, data


def losses(model, x, y, target):
    z = model(x)
    return F.cross_entropy(z, y), 0.7 * F.mse_loss(z, target)


def test_with_delta_zero_it_is_sgd_on_the_summed_loss():
    model, data = tiny_problem()
    reference, _ = tiny_problem()
    dot = DOT(model.parameters(), lr=LR, momentum=MOMENTUM, delta=0.0, weight_decay=DECAY)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for x, y, target in data:
        dot.zero_grad(set_to_none=True)
        dot.step_parts(*losses(model, x, y, target))
        sgd.zero_grad()
        sum(losses(reference, x, y, target)).backward()
        sgd.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-13)


def test_a_plain_backward_and_step_is_sgd_whatever_delta():
    model, data = tiny_problem(1)
    reference, _ = tiny_problem(1)
    dot = DOT(model.parameters(), lr=LR, momentum=MOMENTUM, delta=0.075, weight_decay=DECAY)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for x, y, target in data:
        for optimizer, net in ((dot, model), (sgd, reference)):
            optimizer.zero_grad()
            sum(losses(net, x, y, target)).backward()
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-13)


def np_dot_run(w, u, v, A, b, C, d, steps, lr, m, delta, wd):
    """mdistiller's engine/dot.py update written out in numpy for task = |Aw + u - b|^2 / 2 and
    distillation = |Cw + v - d|^2 / 2: w gets both gradients, u only the task's, v only the distillation's."""
    task_w = task_u = kd_w = kd_v = None
    for _ in range(steps):
        r, s = A @ w + u - b, C @ w + v - d
        g_w, g_u, h_w, h_v = A.T @ r, r, C.T @ s, s
        task_w = g_w + wd * w if task_w is None else (m - delta) * task_w + g_w + wd * w
        kd_w = h_w if kd_w is None else (m + delta) * kd_w + h_w
        task_u = g_u + wd * u if task_u is None else m * task_u + g_u + wd * u     # task-only: mean momentum
        kd_v = h_v if kd_v is None else m * kd_v + h_v + wd * v                    # kd-only: mean momentum, decay
        w, u, v = w - lr * task_w - lr * kd_w, u - lr * task_u, v - lr * kd_v
    return w, u, v


@pytest.mark.parametrize("delta", [0.075, 0.05])
def test_with_delta_it_follows_the_authors_update_equations(delta):
    rng = np.random.default_rng(0)
    A, C = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    b, d = rng.normal(size=2), rng.normal(size=2)
    w0, u0, v0 = rng.normal(size=3), rng.normal(size=2), rng.normal(size=2)
    w, u, v = (torch.nn.Parameter(torch.tensor(a)) for a in (w0, u0, v0))
    optimizer = DOT([w, u, v], lr=LR, momentum=MOMENTUM, delta=delta, weight_decay=0.01)
    tA, tb, tC, td = (torch.tensor(a) for a in (A, b, C, d))
    for _ in range(7):
        optimizer.zero_grad(set_to_none=True)
        optimizer.step_parts(0.5 * (tA @ w + u - tb).pow(2).sum(), 0.5 * (tC @ w + v - td).pow(2).sum())
    expected = np_dot_run(w0, u0, v0, A, b, C, d, 7, LR, MOMENTUM, delta, 0.01)
    for got, want in zip((w, u, v), expected):
        assert np.allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-14)
    state = optimizer.state[w]
    assert set(state) == {"momentum_buffer", "momentum_kd_buffer"}
    assert set(optimizer.state[u]) == {"momentum_buffer"} and set(optimizer.state[v]) == {"momentum_kd_buffer"}


def test_a_saved_state_continues_identically():
    model, data = tiny_problem(2)
    straight = DOT(model.parameters(), lr=LR, momentum=MOMENTUM, delta=0.075, weight_decay=DECAY)
    resumed_model, _ = tiny_problem(2)
    first = DOT(resumed_model.parameters(), lr=LR, momentum=MOMENTUM, delta=0.075, weight_decay=DECAY)
    for i, (x, y, target) in enumerate(data):
        straight.step_parts(*losses(model, x, y, target))
        if i == 2:
            saved = first.state_dict()
            first = DOT(resumed_model.parameters(), lr=LR, momentum=MOMENTUM, delta=0.075, weight_decay=DECAY)
            first.load_state_dict(saved)
        first.step_parts(*losses(resumed_model, x, y, target))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("momentum,delta", [(0.9, 0.1), (0.05, 0.075)])
def test_momenta_outside_zero_to_one_are_rejected(momentum, delta):
    with pytest.raises(ValueError, match="momentum - delta"):
        DOT([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=momentum, delta=delta, weight_decay=DECAY)


def test_the_optim_option_builds_dot_with_the_authors_delta():
    cfg = compose_config(["optim=dot"])
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, DOT) and optimizer.defaults["delta"] == 0.075
    assert cfg.optim.batch_size == 64 and cfg.optim.optimizer.lr == 0.1


@pytest.mark.slow
def test_train_runs_kd_with_dot_end_to_end(tmp_path, random_teacher_ckpts):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "optim=dot", "method=kd", "kd_epochs=1", "model@model.teacher=resnet20",
                      f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "kd" and len(results["history"]) == 1 and np.isfinite(results["history"][0]["loss"])
    assert "kd.optim.dot.DOT" in (run_dir / ".hydra" / "config.yaml").read_text()
