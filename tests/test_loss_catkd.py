"""CAT-KD (kd/losses/catkd.py): against a loop over the paper's class activation maps, against the authors' CAT_loss
(tests/fixtures/catkd_reference.json), and on real networks: the map the classifier pools, the student's classifier
trained through the loss and never part of the loss's state."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_config
from kd import run
from reference import (ClassifierHead, assert_gradient_summary, batch as make_batch, classifier_fixture_inputs,
                       cross_entropy as np_ce, outputs)

FIXTURE = Path(__file__).parent / "fixtures" / "catkd_reference.json"
TAPS = {"classifier_map": "body", "embed": "fc:input"}
FEATURES = ["classifier_map", "embed"]


def make_cat_kd(w_s, b_s, w_t, b_t, student_shape, teacher_shape, **overrides):
    from kd.losses.catkd import CATKD
    args = dict(ce_weight=1.0, weight=15.0, resolution=2, normalize=False)
    shapes = {"student": {"classifier_map": tuple(student_shape)}, "teacher": {"classifier_map": tuple(teacher_shape)}}
    student, teacher = ClassifierHead(w_s, b_s), ClassifierHead(w_t, b_t)
    loss = CATKD(**{**args, **overrides}, features=FEATURES, feature_shapes=shapes, student_model=student,
                 student_taps=TAPS, teacher_model=teacher, teacher_taps=TAPS)
    return loss, student


def np_block_mean(a, size):
    *lead, h, w = a.shape
    return a.reshape(*lead, size, h // size, size, w // size).mean((-3, -1))


def paper_cams(f, w, size, normalize):
    """CAM_k(h, w) = sum_c W_kc F_c(h, w) at full resolution, by loops over classes, then pooled to size x size."""
    f, w = f.numpy(), w.numpy()
    cams = np.zeros((f.shape[0], w.shape[0], *f.shape[2:]))
    for k in range(w.shape[0]):
        for c in range(w.shape[1]):
            cams[:, k] += w[k, c] * f[:, c]
    cams = np_block_mean(cams, size)
    if normalize:
        cams = cams / np.sqrt((cams**2).sum((2, 3), keepdims=True))
    return cams


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("resolution", [1, 2, 4])
def test_cat_kd_against_a_loop_over_the_papers_class_activation_maps(normalize, resolution):
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(5, 16, 8, 8, generator=g), torch.randn(5, 32, 4, 4, generator=g)
    w_s, w_t = torch.randn(7, 16, generator=g), torch.randn(7, 32, generator=g)
    b_s, b_t = torch.randn(7, generator=g), torch.randn(7, generator=g)  # the maps use no bias
    zs, y = torch.randn(5, 7, generator=g), torch.randint(7, (5,), generator=g)
    loss, _ = make_cat_kd(w_s, b_s, w_t, b_t, (16, 8, 8), (32, 4, 4), ce_weight=0.5, weight=3.0,
                          resolution=resolution, normalize=normalize)
    parts = loss(outputs(zs, classifier_map=fs), outputs(torch.randn(5, 7), classifier_map=ft), make_batch(y))
    cat = np.mean((paper_cams(fs, w_s, resolution, normalize) - paper_cams(ft, w_t, resolution, normalize)) ** 2)
    assert parts.terms["cat"].item() == pytest.approx(cat, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(3.0 * cat, rel=1e-10)
    assert parts.task.item() == pytest.approx(0.5 * np_ce(zs.numpy(), y.numpy()), rel=1e-10)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", range(3))
def test_cat_kd_matches_the_authors_cat_loss(case):
    """Fixture: the authors' CAT_loss on their "_test" networks' maps (classifier weight as a bias-free 1x1 conv),
    run by /tmp/ref_catkd.py on seeded float64 maps and classifier weights: value and gradients."""
    reference = json.loads(FIXTURE.read_text())
    expected = reference["cases"][case]
    f_s, f_t, w_s, b_s, w_t, b_t, labels = classifier_fixture_inputs(expected["inputs"])
    loss, student = make_cat_kd(w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:], resolution=expected["resolution"],
                                normalize=expected["normalize"])
    f_s.requires_grad_(True)
    zeros = torch.zeros(len(labels), w_s.shape[0])
    parts = loss(outputs(zeros, classifier_map=f_s), outputs(zeros, classifier_map=f_t), make_batch(labels))
    parts.terms["cat"].backward()
    probe_seed = int(reference["gradient_summary"].rsplit("probe_seed ", 1)[1])
    assert parts.terms["cat"].item() == pytest.approx(expected["value"], rel=1e-12)
    assert_gradient_summary(f_s.grad, expected["gradient_wrt_student_features"], probe_seed)
    assert_gradient_summary(student.fc.weight.grad, expected["gradient_wrt_student_classifier_weight"], probe_seed)
    assert student.fc.bias.grad is None or not student.fc.bias.grad.any()  # the maps use no bias


@pytest.mark.usefixtures("float64")
def test_cat_kd_vanishes_for_identical_maps_and_classifiers():
    g = torch.Generator().manual_seed(4)
    f, w, b = torch.randn(3, 8, 4, 4, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    for normalize in (False, True):
        loss, _ = make_cat_kd(w, b, w, b, (8, 4, 4), (8, 4, 4), normalize=normalize)
        parts = loss(outputs(torch.zeros(3, 5), classifier_map=f), outputs(torch.zeros(3, 5), classifier_map=f.clone()),
                     make_batch(torch.tensor([0, 1, 2])))
        assert parts.terms["cat"].item() < 1e-28


# ---------------------------------------------------------------- real networks, as a run builds them

def networks(teacher, student, *overrides):
    cfg = compose_config([*TINY, "method=cat_kd", f"model@model.teacher={teacher}", f"model@model.student={student}",
                          *overrides])
    torch.manual_seed(0)
    teacher_model = instantiate(cfg.model.teacher.arch).eval().requires_grad_(False)
    return run.build_networks(cfg, run.prepare(cfg), teacher_model, torch.arange(50) % 10)


PAIRS = [("resnet20", "smallnet", "stage3", "layer3"), ("resnet18", "smallnet", "stage3", "layer4"),
         ("resnet18", "mobilenetv2", "conv2", "layer4"), ("resnet20", "mobilenetv2", "conv2", "layer3")]


@pytest.mark.parametrize("teacher_arch,student_arch,student_map,teacher_map", PAIRS)
def test_cat_kd_reads_the_map_each_classifier_pools_and_trains_the_students_classifier(teacher_arch, student_arch,
                                                                                        student_map, teacher_map):
    """MobileNetV2's classifier pools its head (conv2, 1280x2x2), not its last stage (160x2x2): the tap follows
    `head` where a model has one. Pooled, the map through the network's classifier gives its logits. The student's
    classifier gets a gradient through the CAT term, yet the loss holds no parameter and no state of its own."""
    student, teacher, loss = networks(teacher_arch, student_arch, "method.loss.ce_weight=0")
    assert student.taps["classifier_map"] == student_map and teacher.taps["classifier_map"] == teacher_map
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        t = teacher.eval()(images)
    s = student.train()(images)
    student_fc = loss.classifiers.student_layer
    assert student_fc is student.model.get_submodule({"smallnet": "fc", "mobilenetv2": "classifier.0"}[student_arch])
    for out, (weight, bias) in ((s, loss.classifiers.weights("student")), (t, loss.classifiers.weights("teacher"))):
        pooled = out.features["classifier_map"].mean((2, 3))
        assert torch.allclose(F.linear(pooled, weight, bias), out.logits, atol=1e-5)
    parts = loss(s, t, make_batch(torch.arange(4) % 10))
    assert parts.task.item() == 0 and parts.terms["cat"].item() > 0
    parts.distillation.backward()
    assert student_fc.weight.grad is not None and student_fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    student_storage = {p.data_ptr() for p in student.parameters()}
    assert not student_storage & {b.data_ptr() for b in loss.buffers()}  # the teacher's copy only
    assert "10 class maps of 2x2" in loss.scale_note()


def test_cat_kd_refuses_a_map_the_classifier_does_not_read():
    with pytest.raises(ValueError, match=r"student's 'feat' \('blocks.6'\) has 160 channels but its classifier reads "
                                         r"1280"):
        networks("resnet20", "mobilenetv2", "method.loss.features=[feat,embed]")


def test_cat_kd_refuses_a_fractional_resolution():
    from kd.losses.catkd import CATKD
    with pytest.raises(ValueError, match="resolution 2.5 is not a whole number"):
        CATKD(1.0, 1.0, 2.5, False, FEATURES, None, None, TAPS, None, TAPS)
