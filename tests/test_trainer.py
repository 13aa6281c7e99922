"""The training loop on real configs and generated data: learning, frozen teacher, errors, resume."""
import copy

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_config
from kd import teacher as teachers
from kd.data import build_splits
from kd.device import Acceleration
from kd.run import probe_feature_shapes, train
from kd.trainer import NonFiniteLoss, Trainer


def _parts(method, teacher_ckpt, extra=()):
    cfg = compose_config([*TINY, f"method={method}", "model/teacher=resnet20", f"model.teacher.ckpt={teacher_ckpt}",
                          *extra])
    splits = build_splits(instantiate(cfg.data.source), 0.1, 0, 10, None, torch.device("cpu"))
    taps = list(cfg.method.taps)
    teacher = teachers.tapped(cfg.model.teacher, teachers.load_or_train(cfg, splits, torch.device("cpu"),
                                                                        torch.float32), taps)
    torch.manual_seed(cfg.seed)
    student = teachers.tapped(cfg.model.student, instantiate(cfg.model.student.arch), taps)
    loss = instantiate(cfg.method.loss, feature_shapes=probe_feature_shapes(student, teacher, torch.device("cpu")))
    return cfg, splits, teacher, student, loss


def test_teacher_stays_frozen_while_student_and_loss_parts_learn(random_teacher_ckpts):
    cfg, splits, teacher, student, loss = _parts("fitnet", random_teacher_ckpts["resnet20"], ["kd_epochs=1"])
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    student_before = copy.deepcopy(student.model.state_dict())
    loss_before = copy.deepcopy(loss.state_dict())
    Trainer(student, loss, teacher, splits, cfg.optim, 1, 0, torch.float32, 500, "fitnet", progress=False).fit()
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in teacher_before.items())  # BN stats too
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert any(not torch.equal(v, student.model.state_dict()[k]) for k, v in student_before.items())
    assert not torch.equal(loss_before["projector.0.weight"], loss.state_dict()["projector.0.weight"])


def test_folding_the_teachers_batchnorm_changes_results_only_by_rounding(random_teacher_ckpts):
    histories = {}
    for fold in (False, True):
        cfg, splits, teacher, student, loss = _parts("fitnet", random_teacher_ckpts["resnet20"], ["kd_epochs=1"])
        for m in teacher.modules():  # statistics far from the identity, so a wrong fold would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(m.num_features))
        trainer = Trainer(student, loss, teacher, splits, cfg.optim, 1, 0, torch.float32, 500, "fitnet",
                          progress=False, acceleration=Acceleration(fold_teacher_batchnorm=fold))
        histories[fold] = trainer.fit().history[0]
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()) is not fold
    assert histories[True]["loss"] == pytest.approx(histories[False]["loss"], rel=1e-4)
    assert histories[True]["terms"]["hint"] == pytest.approx(histories[False]["terms"]["hint"], rel=1e-4)


def test_student_learns_on_synthetic_data(random_teacher_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, "method=ce", "kd_epochs=2", "model/teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", "data.source.num_train=1500"])
    results = train(cfg)
    assert results["test_acc"] > 0.8, results  # chance is 0.1
    assert results["train_acc"] > 0.8 and len(results["history"]) == 2
    assert (tmp_path / "results.json").exists() and (tmp_path / "student.pt").exists()
    assert not (tmp_path / "training-state.pt").exists()


def test_non_finite_loss_stops_with_method_epoch_and_step(random_teacher_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, "method=kd", "kd_epochs=1", "method.loss.temperature=0", "model/teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"])
    with pytest.raises(NonFiniteLoss, match=r"kd: the loss became non-finite at epoch 1, step 1"):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_resume_after_interruption_gives_identical_results(random_teacher_ckpts, tmp_path, monkeypatch):
    common = [*TINY, "method=crd", "kd_epochs=3", "model/teacher=resnet20",
              f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"]
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = train(compose_config(common))

    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")

    class Killed(Exception):
        pass

    original = Trainer._save_state

    def save_then_die_after_epoch_2(self, state):
        original(self, state)
        if state.next_epoch == 2:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_state", save_then_die_after_epoch_2)
    with pytest.raises(Killed):
        train(compose_config(common))
    monkeypatch.setattr(Trainer, "_save_state", original)
    resumed = train(compose_config(common))
    assert resumed["resumed_from_epoch"] == 2
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    for key in ("train_acc", "val_acc", "test_acc", "best_epoch"):
        assert resumed[key] == straight[key]
    # a finished run is not trained again
    again = train(compose_config(common))
    assert again == resumed
