"""SimKD: the deployed student (projector + the teacher's frozen classifier) and its loss against the authors' code
(values and gradients from tests/fixtures/simkd_reference.json), and a run that trains, tests and saves that network."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY, compose_config, run_train
from kd.checkpoints import extract_state_dict
from kd.evaluate import main as evaluate_main
from kd.losses.simkd import SimKD
from kd.models import build
from kd.models.reused_classifier import ReusedTeacherClassifier, projector
from kd.setup import prepare
from kd.taps import Outputs, TappedModel
from kd.validation import ConfigError
from reference import batch

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "simkd_reference.json").read_text())


def summarised(t, first, probe_seed=11):
    t = t.detach().flatten()
    probe = torch.randn(t.numel(), generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    return {"sum": t.sum().item(), "abs_sum": t.abs().sum().item(), "first": t[:len(first)].tolist(),
            "dot_probe": (t @ probe).item()}


def assert_close(got, expected, rel=1e-9):
    for key in ("sum", "abs_sum", "dot_probe"):
        assert got[key] == pytest.approx(expected[key], rel=rel, abs=1e-12), key
    assert got["first"] == pytest.approx(expected["first"], rel=rel, abs=1e-12)


def fixture_case(inputs):
    """The fixture's inputs and a deployed student around a pass-through backbone (its images are the feature map)."""
    g = torch.Generator().manual_seed(inputs["seed"])
    batch_size, classes = inputs["batch"], inputs["classes"]
    student_shape, teacher_shape = inputs["student_shape"], inputs["teacher_shape"]
    f_s = torch.randn(batch_size, *student_shape, generator=g, dtype=torch.float64).clamp_min(0)
    f_t = torch.randn(batch_size, *teacher_shape, generator=g, dtype=torch.float64).clamp_min(0)
    w_t = torch.randn(classes, teacher_shape[0], generator=g, dtype=torch.float64) / teacher_shape[0] ** 0.5
    b_t = 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)
    labels = torch.randint(classes, (batch_size,), generator=g)
    check = inputs["check"]
    assert f_s.sum().item() == pytest.approx(check["student_sum"], rel=1e-12)
    assert labels.tolist() == check["labels"]

    backbone = nn.Sequential(OrderedDict(feat=nn.Identity(), fc=nn.Linear(3, classes)))
    teacher_arch = OmegaConf.create({"_target_": "test_loss_simkd.MapTeacher", "channels": teacher_shape[0],
                                     "size": teacher_shape[1], "classes": classes})
    student = ReusedTeacherClassifier(backbone, "feat", teacher_arch, "feat", "linear:input", inputs["factor"],
                                      image_size=student_shape[1:])
    assert isinstance(student.backbone.fc, nn.Identity)  # never reached: removed
    student.projector = projector(student_shape[0], teacher_shape[0], inputs["factor"])  # the backbone passes 3
    student.double()
    gw = torch.Generator().manual_seed(inputs["weight_seed"])
    parameters = dict(student.projector.named_parameters())
    assert [list(p.shape) for p in parameters.values()] == list(inputs["parameters"].values())
    scales = {id(m.weight) for m in student.projector.modules() if isinstance(m, nn.BatchNorm2d)}
    with torch.no_grad():
        for p in parameters.values():  # the recipe's order: the authors' `transfer` has the same layers
            p.copy_(torch.randn(p.shape, generator=gw, dtype=torch.float64) * inputs["weight_scale"]
                    + (1.0 if id(p) in scales else 0.0))
    teacher = MapTeacher(teacher_shape[0], teacher_shape[1], classes).double()
    with torch.no_grad():
        teacher.linear.weight.copy_(w_t)
        teacher.linear.bias.copy_(b_t)
    return f_s, f_t, labels, student, teacher


class MapTeacher(nn.Module):
    """A teacher whose last feature map is `channels` x `size` x `size` and whose classifier is `linear`."""

    def __init__(self, channels: int, size: int, classes: int):
        super().__init__()
        self.conv, self.feat, self.linear = nn.Conv2d(3, channels, 1), nn.AdaptiveAvgPool2d(size), nn.Linear(channels,
                                                                                                             classes)

    def forward(self, images):
        return self.linear(self.feat(self.conv(images)).mean((2, 3)))


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_the_deployed_student_and_the_loss_match_the_authors_code(name):
    case = FIXTURE["cases"][name]
    inputs = case["inputs"]
    f_s, f_t, labels, student, teacher = fixture_case(inputs)
    student_larger = inputs["student_shape"][1] > inputs["teacher_shape"][1]
    assert student.source_size == (tuple(inputs["teacher_shape"][1:]) if student_larger else None)
    loss = SimKD(weight=1.0, ce_weight=0.0, student_model=student, teacher_model=teacher)
    assert torch.equal(student.classifier.weight, teacher.linear.weight)
    assert not student.classifier.weight.requires_grad
    channels = inputs["student_shape"][0]
    net = TappedModel(student, [0.0] * channels, [1.0] * channels, {"feat": "projector"})
    images = f_s.clone().requires_grad_()
    out = net(images)
    parts = loss(out, Outputs(torch.zeros(len(labels), inputs["classes"]), {"feat": f_t}), batch(labels))

    assert parts.terms["feature"].item() == pytest.approx(case["feature"], rel=1e-10)
    assert parts.total.item() == pytest.approx(case["feature"], rel=1e-10)  # ce_weight 0: the authors' -c 0
    assert_close(summarised(out.logits, case["logits"]["first"]), case["logits"])
    assert parts.terms["ce"].item() == pytest.approx(case["ce"], rel=1e-10)
    grad_map, grad_conv = torch.autograd.grad(parts.total, [images, student.projector[0].weight], retain_graph=True)
    assert_close(summarised(grad_map, case["gradient_wrt_student_map"]["first"]), case["gradient_wrt_student_map"])
    assert_close(summarised(grad_conv, case["gradient_wrt_first_conv"]["first"]), case["gradient_wrt_first_conv"])
    grad_ce = torch.autograd.grad(parts.terms["ce"], images)[0]
    assert_close(summarised(grad_ce, case["ce_gradient_wrt_student_map"]["first"]),
                 case["ce_gradient_wrt_student_map"])


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_the_loss_and_logits_are_the_papers_formula_on_the_projected_map(name):
    """Independent of the authors' code: with P the projected map, z_s = W_t mean_hw(P) + b_t and
    loss = mean((P - F_t)^2), F_t average-pooled in blocks to P's size where it is larger (numpy)."""
    inputs = FIXTURE["cases"][name]["inputs"]
    f_s, f_t, labels, student, teacher = fixture_case(inputs)
    loss = SimKD(weight=1.0, ce_weight=0.0, student_model=student, teacher_model=teacher)
    channels = inputs["student_shape"][0]
    features = {}
    student.projector.register_forward_hook(lambda _m, _i, out: features.update(projected=out))
    net = TappedModel(student, [0.0] * channels, [1.0] * channels, {"feat": "projector"})
    out = net(f_s)
    parts = loss(out, Outputs(torch.zeros(len(labels), inputs["classes"]), {"feat": f_t}), batch(labels))
    p, t = features["projected"].detach().numpy(), f_t.numpy()
    k = t.shape[-1] // p.shape[-1]
    t = t.reshape(*t.shape[:2], p.shape[-2], k, p.shape[-1], k).mean((3, 5))  # blocks of k x k
    assert parts.terms["feature"].item() == pytest.approx(((p - t) ** 2).mean(), rel=1e-12)
    w, b = teacher.linear.weight.detach().numpy(), teacher.linear.bias.detach().numpy()
    assert out.logits.detach().numpy() == pytest.approx(p.mean((2, 3)) @ w.T + b, rel=1e-12, abs=1e-12)


def test_the_deployed_student_drops_the_layers_after_its_feature_map():
    cfg = compose_config(["method=simkd", "model@model.teacher=resnet32x4", "model@model.student=mobilenetv2",
                          "data=cifar100"])
    student = build(cfg.model.student)
    plain = build(OmegaConf.merge(cfg.model.student, {"wrapper": None}))
    removed = {name for name, m in student.backbone.named_modules() if isinstance(m, nn.Identity)}
    assert {"conv2.0", "classifier.0"} <= removed  # MobileNetV2's last 1x1 conv and its own classifier
    backbone_params = sum(p.numel() for p in student.backbone.parameters())
    assert backbone_params == sum(p.numel() for name, p in plain.named_parameters()
                                  if not name.startswith(("conv2.", "classifier.")))
    assert student.classifier.in_features == 256 and student.classifier.out_features == 100  # ResNet-32x4's
    assert student.projector[0].in_channels == 160  # MobileNetV2's last stage (blocks.6), measured by the probe
    assert student.source_size is None  # 2x2 against the teacher's 8x8: the teacher's map is pooled, in the loss
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("image_size,pooled_to", [((32, 32), (4, 4)), ((64, 48), (8, 6))])
def test_a_larger_student_map_is_pooled_to_the_teachers_in_the_network_as_built(image_size, pooled_to):
    """ResNet-8's map is 8x8 and ResNet-18's 4x4 on CIFAR images; the pooling is part of the network built from the
    config, so the report's FLOPs and a reloaded student.pt are the trained network's."""
    cfg = compose_config(["method=simkd", "model@model.teacher=resnet18", "model@model.student=resnet8"])
    student = build(cfg.model.student, image_size)
    assert student.source_size == pooled_to
    features = {}
    student.projector.register_forward_hook(lambda _m, _i, out: features.update(projected=out))
    student(torch.zeros(2, 3, *image_size))
    assert features["projected"].shape == (2, 512, *pooled_to)


def test_simkd_through_a_teacher_assistant_is_refused_before_any_work():
    cfg = compose_config([*TINY, "method=simkd", "+method.assistant={model: resnet20, epochs: 1}"])
    with pytest.raises(ConfigError, match=r"cannot train through a teacher assistant \(method.assistant\)"):
        prepare(cfg)


def test_simkd_without_its_wrapper_is_refused_before_any_work():
    cfg = compose_config([*TINY, "method=simkd", "model.student.wrapper=null"])
    with pytest.raises(ConfigError, match=r"model.student.wrapper.*null"):
        prepare(cfg)


@pytest.mark.slow
def test_a_simkd_run_learns_and_saves_the_network_it_tested(tmp_path, capsys):
    run = tmp_path / "run"
    proc = run_train([*TINY, "method=simkd", "kd_epochs=8", "model@model.teacher=resnet20",
                      "model@model.student=resnet8", "teacher_training.epochs=15", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["test_acc"] > 0.5  # 10 synthetic classes: chance is 0.1

    saved = extract_state_dict(torch.load(run / "student.pt", weights_only=False))
    teacher = extract_state_dict(torch.load(tmp_path / "checkpoints" / "teachers" / "resnet20_synthetic.pt",
                                            weights_only=False))
    assert torch.equal(saved["classifier.weight"], teacher["linear.weight"])  # the teacher's, never trained
    assert not any(key.startswith("backbone.linear.") for key in saved)  # the student's own classifier is gone

    out = tmp_path / "evaluated.json"
    assert evaluate_main([str(run), "--latency-repeats", "1", "--latency-batch", "2", "--latency-warmup", "0",
                          "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["test_acc"] == pytest.approx(results["test_acc"], abs=1e-12)
    assert evaluated["params"] == results["student"]["params"]
