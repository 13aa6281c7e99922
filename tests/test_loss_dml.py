"""DML: the two mutual terms against a direct computation of the paper's losses, each network's gradient coming
from its own loss only, and a run in which both the student and its peer learn."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose_config, run_train
from reference import cross_entropy as np_ce, log_softmax as np_log_softmax, outputs
from kd.losses.batch import Batch
from kd.losses.dml import DeepMutualLearning

pytestmark = pytest.mark.usefixtures("float64")
NORM = OmegaConf.create({"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})


def _loss(weight=1.0, temperature=1.0):
    torch.manual_seed(0)
    arch = OmegaConf.create({"_target_": "kd.models.SmallNet", "num_classes": 10})
    return DeepMutualLearning(arch, NORM, weight, temperature).double()


def _kl(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)), per sample, by its definition, averaged."""
    lp, lq = np_log_softmax(p_logits / T), np_log_softmax(q_logits / T)
    return np.mean([sum(np.exp(lp[i, c]) * (lp[i, c] - lq[i, c]) for c in range(p_logits.shape[1]))
                    for i in range(len(p_logits))])


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return Batch(images, torch.randint(10, (n,), generator=g), torch.arange(n))


def test_the_loss_is_both_networks_cross_entropy_and_their_two_kl_terms():
    loss, batch = _loss(weight=0.7, temperature=2.0), _batch()
    z_s = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    z_p = loss.peer((batch.images - torch.tensor(NORM.mean).view(1, 3, 1, 1)) /
                    torch.tensor(NORM.std).view(1, 3, 1, 1)).detach().numpy()
    parts = loss(outputs(z_s), None, batch)
    y, s = batch.labels.numpy(), z_s.numpy()
    assert parts.task.item() == pytest.approx(np_ce(s, y) + np_ce(z_p, y), rel=1e-10)
    assert parts.terms["mutual"].item() == pytest.approx(4 * _kl(z_p, s, 2.0), rel=1e-10)
    assert parts.terms["mutual_peer"].item() == pytest.approx(4 * _kl(s, z_p, 2.0), rel=1e-10)
    assert parts.distillation.item() == pytest.approx(0.7 * 4 * (_kl(z_p, s, 2.0) + _kl(s, z_p, 2.0)), rel=1e-10)


def test_each_network_gets_the_gradient_of_its_own_loss_only():
    loss, batch = _loss(), _batch()
    z_s = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    loss(outputs(z_s), None, batch).total.backward()
    z_p = loss.peer((batch.images - loss.mean) / loss.std).detach()
    expected = (torch.softmax(z_s, 1) - torch.nn.functional.one_hot(batch.labels, 10)) / 6 \
        + (torch.softmax(z_s, 1) - torch.softmax(z_p, 1)) / 6   # d/dz_s [CE + KL(p_peer || p_s)], z_p constant
    assert torch.allclose(z_s.grad, expected.detach(), atol=1e-12)
    assert all(p.grad is not None for p in loss.peer.parameters())


def test_the_peer_is_built_after_the_student_from_the_run_seed():
    cfg = compose_config(["method=dml", "model@model.student=smallnet"])
    assert cfg.method.loss.peer_arch == cfg.model.student.arch and cfg.method.loss.normalization == \
        cfg.model.student.normalization
    torch.manual_seed(3)
    first = DeepMutualLearning(cfg.method.loss.peer_arch, cfg.method.loss.normalization, 1.0, 1.0)
    torch.manual_seed(3)
    again = DeepMutualLearning(cfg.method.loss.peer_arch, cfg.method.loss.normalization, 1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_a_dml_run_trains_the_student_and_its_peer_without_a_teacher(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "method=dml", "kd_epochs=3", "data.source.num_train=1000", "model@model.teacher=smallnet",
                      f"model.teacher.ckpt={tmp_path / 'teacher.pt'}", "teacher_training.epochs=1",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_acc"] > 0.5 and results["history"][-1]["terms"]["peer_acc"] > 0.5  # chance: 0.1
    saved = torch.load(run_dir / "student.pt", weights_only=False)
    assert any(k.startswith("peer.") for k in saved["loss_state_dict"])
