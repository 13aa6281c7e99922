"""Every method in conf/method/, built from its real config for real student/teacher pairs: gradients reach the
student and the loss's own parts but never the teacher, and the loss stays finite for tiny batches and extreme
logits. Each loss's formula is checked against an independent computation in tests/test_loss_<name>.py.
"""
import pytest
import torch
from hydra.utils import instantiate

from conftest import METHODS, TINY, compose_config
from kd import run
from kd.losses.base import loss_factory
from kd.losses.batch import Batch, Progress
from kd.taps import Outputs

pytestmark = pytest.mark.filterwarnings("ignore")
TEACHERS = ["resnet18", "resnet56"]  # 4 stages ending at 512x4x4, 3 stages ending at 64x8x8
NUM_TRAIN = 50


def networks(method, teacher_arch):
    cfg = compose_config([*TINY, f"method={method}", f"model@model.teacher={teacher_arch}"])
    torch.manual_seed(0)
    teacher_model = instantiate(cfg.model.teacher.arch).eval().requires_grad_(False)
    return run.build_networks(cfg, run.prepare(cfg), teacher_model, torch.arange(NUM_TRAIN) % 10)


def step_inputs(student, teacher, size, logit_scale=1.0):
    images = torch.rand(size, 3, 32, 32)
    with torch.no_grad():
        t = teacher.eval()(images)
    out = student(images)
    labels = torch.arange(size) % 10
    batch = Batch(images, labels, torch.randperm(NUM_TRAIN)[:size], Progress(0, 0, 3, 2))
    return (Outputs(out.logits * logit_scale, out.features),
            Outputs(t.logits * logit_scale, t.features) if logit_scale != 1 else t, batch)


@pytest.mark.parametrize("teacher_arch", TEACHERS)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_student_and_loss_parts_but_not_the_teacher(method, teacher_arch):
    student, teacher, loss = networks(method, teacher_arch)
    s, t, batch = step_inputs(student, teacher, 4)
    parts = loss(s, t if loss.needs_teacher else None, batch)
    assert torch.allclose(parts.total, parts.task + parts.distillation)
    assert "ce" in parts.terms and all(v.dim() == 0 for v in parts.terms.values())
    parts.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in student.model.parameters())
    for name, p in loss.named_parameters():
        if p.requires_grad:  # parts a preparation stage trained and froze are not the main loss's to move
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_finite_for_tiny_batches_and_extreme_logits(method, batch_size):
    for teacher_arch in TEACHERS:
        student, teacher, loss = networks(method, teacher_arch)
        for scale in (1.0, 1e4):
            student.zero_grad()
            s, t, batch = step_inputs(student, teacher, batch_size, scale)
            parts = loss(s, t if loss.needs_teacher else None, batch)
            parts.total.backward()
            assert torch.isfinite(parts.total), (method, teacher_arch, batch_size, parts.terms)
            assert all(torch.isfinite(v) for v in parts.terms.values())
            for p in [*student.parameters(), *loss.parameters()]:
                assert p.grad is None or torch.isfinite(p.grad).all(), (method, teacher_arch)


# ---------------------------------------------------------------- building a loss from its YAML

def test_a_misspelt_loss_argument_names_itself_and_the_valid_ones():
    cfg = compose_config(["method=kd", "+method.loss.temprature=2"])
    with pytest.raises(ValueError, match=r"VanillaKD takes no argument \['temprature'\]; its arguments are "
                                         r"\['temperature', 'alpha', 'standardize', 'entropy_aware', "):
        loss_factory(cfg.method.loss)


def test_a_missing_loss_argument_and_an_unknown_target_are_named():
    cfg = compose_config(["method=kd", "~method.loss.alpha"])
    with pytest.raises(ValueError, match=r"VanillaKD needs \['alpha'\]"):
        loss_factory(cfg.method.loss)
    cfg = compose_config(["method=kd", "method.loss._target_=kd.losses.kd.NoSuchLoss"])
    with pytest.raises(ValueError, match="NoSuchLoss"):
        loss_factory(cfg.method.loss)


def test_only_the_arguments_a_loss_names_are_provided():
    ce = loss_factory(compose_config(["method=ce"]).method.loss)(feature_shapes={"student": {}}, num_classes=10,
                                                                  num_train=5)
    assert type(ce).__name__ == "CrossEntropy"  # takes none of them, and was not handed any
