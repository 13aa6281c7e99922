"""The training loop on real configs and generated data: learning, frozen teacher, errors, resume."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_config
from kd import run
from kd import teacher as teachers
from kd.data import build_splits
from kd.device import Acceleration
from kd.losses.base import DistillationLoss, LossParts
from kd.run import train
from kd.taps import probe_shapes
from kd.trainer import NonFiniteLoss, Trainer, TrainerSettings


def _parts(method, teacher_ckpt, extra=()):
    cfg = compose_config([*TINY, f"method={method}", "model@model.teacher=resnet20", f"model.teacher.ckpt={teacher_ckpt}",
                          *extra])
    splits = build_splits(instantiate(cfg.data.source), 0.1, 0, 10, None, torch.device("cpu"))
    prepared = run.prepare(cfg)
    teacher_model = teachers.load_or_train(cfg, splits, torch.device("cpu"), torch.float32)
    student, teacher, loss = run.build_networks(cfg, prepared, teacher_model, splits.train_y)
    return cfg, splits, teacher, student, loss


def test_teacher_stays_frozen_while_student_and_loss_parts_learn(random_teacher_ckpts):
    cfg, splits, teacher, student, loss = _parts("fitnet", random_teacher_ckpts["resnet20"], ["kd_epochs=1"])
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    student_before = copy.deepcopy(student.model.state_dict())
    loss_before = copy.deepcopy(loss.state_dict())
    Trainer(student, loss, teacher, splits, TrainerSettings(cfg.optim, 1, 0, label="fitnet", progress=False)).fit()
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
        trainer = Trainer(student, loss, teacher, splits, TrainerSettings(
            cfg.optim, 1, 0, label="fitnet", progress=False, acceleration=Acceleration(fold_teacher_batchnorm=fold)))
        histories[fold] = trainer.fit().history[0]
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()) is not fold
    assert histories[True]["loss"] == pytest.approx(histories[False]["loss"], rel=1e-4)
    assert histories[True]["terms"]["hint"] == pytest.approx(histories[False]["terms"]["hint"], rel=1e-4)


def test_student_learns_on_synthetic_data(random_teacher_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, "method=ce", "kd_epochs=2", "model@model.teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}", "data.source.num_train=1500"])
    results = train(cfg)
    assert results["test_acc"] > 0.8, results  # chance is 0.1
    assert results["train_acc"] > 0.8 and len(results["history"]) == 2
    assert (tmp_path / "results.json").exists() and (tmp_path / "student.pt").exists()
    assert not (tmp_path / "training-state.pt").exists()


def test_non_finite_loss_stops_with_method_epoch_and_step(random_teacher_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*TINY, "method=kd", "kd_epochs=1", "method.loss.temperature=1e-300", "model@model.teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"])
    with pytest.raises(NonFiniteLoss, match=r"kd: the loss became non-finite at epoch 1, step 1"):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_resume_after_interruption_gives_identical_results(random_teacher_ckpts, tmp_path, monkeypatch):
    common = [*TINY, "method=crd", "kd_epochs=3", "model@model.teacher=resnet20",
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


# ---------------------------------------------------------------- what the core offers a loss

class Killed(Exception):
    pass


def _kill_after_saving(monkeypatch, when):
    original = Trainer._save_state

    def save_then_die(self, state):
        original(self, state)
        if when(state):
            raise Killed
    monkeypatch.setattr(Trainer, "_save_state", save_then_die)
    return lambda: monkeypatch.setattr(Trainer, "_save_state", original)


class MemoryBankLoss(DistillationLoss):
    """A throwaway loss with a per-image memory bank, indexed by the batch's training-set positions, and
    negatives drawn from the global random generator (whose state the training state keeps)."""

    def __init__(self, num_train, feature_shapes):
        super().__init__()
        dim = feature_shapes["teacher"]["embed"][0]
        self.head = torch.nn.Linear(feature_shapes["student"]["embed"][0], dim)
        self.register_buffer("bank", torch.zeros(num_train, dim))

    def forward(self, student, teacher, batch):
        e = self.head(student.features["embed"])
        negatives = self.bank[torch.randint(len(self.bank), (len(e), 4))]
        distill = (e - self.bank[batch.indices]).pow(2).mean() - 0.1 * (e[:, None] - negatives).pow(2).mean()
        with torch.no_grad():
            self.bank[batch.indices] = 0.5 * self.bank[batch.indices] + 0.5 * teacher.features["embed"]
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, 0.1 * distill, {"ce": ce, "bank": distill})


class PreparedLoss(DistillationLoss):
    """A throwaway loss whose translator is trained on the teacher's embedding before the student starts."""

    calls = 0

    def __init__(self, prepare_epochs, feature_shapes):
        super().__init__()
        self.prepare_epochs = prepare_epochs
        self.translator = torch.nn.Linear(feature_shapes["teacher"]["embed"][0], 1)

    def prepare(self, preparation):
        PreparedLoss.calls += 1
        optimizer = torch.optim.SGD(self.translator.parameters(), lr=0.01)
        for epoch in range(self.prepare_epochs):
            for batch, teacher in preparation.batches(epoch):
                loss = (self.translator(teacher.features["embed"]).squeeze(1) - batch.labels.float()).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            preparation.log(f"epoch {epoch + 1}: {loss.item():.3f}")

    def forward(self, student, teacher, batch):
        ce = F.cross_entropy(student.logits, batch.labels)
        return LossParts(ce, ce.new_zeros(()), {"ce": ce})


def _trainer_with(loss_class, ckpt, tmp_path, epochs, **loss_args):
    cfg, splits, teacher, student, _ = _parts("ce", ckpt, ["method.taps=[embed]"])
    shapes = {"student": probe_shapes(student, torch.device("cpu")), "teacher": probe_shapes(teacher, torch.device("cpu"))}
    loss = loss_class(feature_shapes=shapes, **loss_args)
    trainer = Trainer(student, loss, teacher, splits, TrainerSettings(cfg.optim, epochs, 0, label=loss_class.__name__,
                                                                      progress=False), state_path=tmp_path / "state.pt")
    return trainer, loss


def test_a_memory_bank_is_indexed_by_sample_and_resumes_identically(random_teacher_ckpts, tmp_path, monkeypatch):
    ckpt = random_teacher_ckpts["resnet20"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    trainer, straight_loss = _trainer_with(MemoryBankLoss, ckpt, tmp_path / "a", 3, num_train=270)
    straight = trainer.fit()
    assert (straight_loss.bank.abs().sum(1) > 0).all()  # every training image's entry was written

    restore = _kill_after_saving(monkeypatch, lambda state: state.next_epoch == 2)
    trainer, _ = _trainer_with(MemoryBankLoss, ckpt, tmp_path / "b", 3, num_train=270)
    with pytest.raises(Killed):
        trainer.fit()
    restore()
    trainer, resumed_loss = _trainer_with(MemoryBankLoss, ckpt, tmp_path / "b", 3, num_train=270)
    resumed = trainer.fit()
    assert resumed.resumed_from_epoch == 2
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert torch.equal(resumed_loss.bank, straight_loss.bank)


def test_preparation_runs_once_before_the_first_epoch_and_its_time_is_apart(random_teacher_ckpts, tmp_path,
                                                                             monkeypatch, caplog):
    ckpt = random_teacher_ckpts["resnet20"]
    PreparedLoss.calls = 0
    trainer, loss = _trainer_with(PreparedLoss, ckpt, tmp_path, 2, prepare_epochs=2)
    before = loss.translator.weight.detach().clone()
    restore = _kill_after_saving(monkeypatch, lambda state: state.next_epoch == 1)
    with caplog.at_level(logging.INFO), pytest.raises(Killed):
        trainer.fit()
    restore()
    assert PreparedLoss.calls == 1 and "PreparedLoss prepare: epoch 2:" in caplog.text
    trainer, loss = _trainer_with(PreparedLoss, ckpt, tmp_path, 2, prepare_epochs=2)
    result = trainer.fit()  # resumed after epoch 1: the preparation is in the saved state, not redone
    assert PreparedLoss.calls == 1 and result.resumed_from_epoch == 1
    assert result.prepare_time_sec > 0
    assert result.train_time_sec == pytest.approx(sum(h["seconds"] for h in result.history))
    assert not torch.equal(loss.translator.weight, before)


def test_a_run_killed_during_preparation_prepares_again(random_teacher_ckpts, tmp_path, monkeypatch):
    ckpt = random_teacher_ckpts["resnet20"]
    PreparedLoss.calls = 0
    original = PreparedLoss.prepare

    def die_while_preparing(self, preparation):
        original(self, preparation)
        raise Killed
    monkeypatch.setattr(PreparedLoss, "prepare", die_while_preparing)
    trainer, _ = _trainer_with(PreparedLoss, ckpt, tmp_path, 1, prepare_epochs=1)
    with pytest.raises(Killed):
        trainer.fit()
    monkeypatch.setattr(PreparedLoss, "prepare", original)
    trainer, _ = _trainer_with(PreparedLoss, ckpt, tmp_path, 1, prepare_epochs=1)
    trainer.fit()
    assert PreparedLoss.calls == 2


def test_history_keeps_task_and_distillation_apart(random_teacher_ckpts):
    cfg, splits, teacher, student, loss = _parts("kd", random_teacher_ckpts["resnet20"], ["kd_epochs=1"])
    settings = TrainerSettings(cfg.optim, 1, 0, label="kd", progress=False)
    record = Trainer(student, loss, teacher, splits, settings).fit().history[0]
    assert record["loss"] == pytest.approx(record["task_loss"] + record["distillation_loss"], rel=1e-5)
    assert record["task_loss"] == pytest.approx(0.3 * record["terms"]["ce"], rel=1e-5)
    assert record["distillation_loss"] == pytest.approx(0.7 * record["terms"]["kd"], rel=1e-5)


def test_a_non_finite_loss_stops_the_run_within_a_hundred_steps(random_teacher_ckpts):
    from kd.trainer import FINITE_CHECK_EVERY
    cfg, splits, teacher, student, _ = _parts("ce", random_teacher_ckpts["resnet20"], ["optim.batch_size=2"])
    steps = []

    class DivergesAtStepThree(DistillationLoss):
        needs_teacher = False

        def forward(self, student, teacher, batch):
            steps.append(batch.progress.step)
            ce = F.cross_entropy(student.logits, batch.labels)
            return LossParts(ce * (float("nan") if len(steps) >= 3 else 1.0), ce.new_zeros(()), {"ce": ce})

    trainer = Trainer(student, DivergesAtStepThree(), None, splits,
                      TrainerSettings(cfg.optim, 1, 0, label="ce", progress=False))
    assert len(trainer.loader) > 1.2 * FINITE_CHECK_EVERY
    with pytest.raises(NonFiniteLoss, match="non-finite at epoch 1, step 3"):
        trainer.fit()
    assert len(steps) == FINITE_CHECK_EVERY  # stopped at the first check, not at the end of the epoch
