"""SD-KD, SD-DKD and SD-NKD (kd/losses/sdd.py, conf/method/sd_kd.yaml, sd_dkd.yaml, sd_nkd.yaml): against loops over
the paper's regions, consistent and complementary terms, against the authors' sdd_kd_loss and multi_dkd
(tests/fixtures/sdd_reference.json) and multi_nkd_loss / nkd_loss_origin (tests/fixtures/sdd_nkd_reference.json), and
on real networks: the map the classifier pools, the student's classifier trained through the loss and never part of
the loss's state."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_config
from kd import run
from kd.losses.batch import Progress
from reference import (ClassifierHead, assert_gradient_summary, batch as make_batch, classifier_fixture_inputs,
                       cross_entropy as np_ce, log_softmax as np_log_softmax, outputs)

FIXTURE = Path(__file__).parent / "fixtures" / "sdd_reference.json"
NKD_FIXTURE = Path(__file__).parent / "fixtures" / "sdd_nkd_reference.json"
TAPS = {"classifier_map": "body", "embed": "fc:input"}
FEATURES = ["classifier_map", "embed"]
BASE_ARGS = {"kd": dict(ce_weight=0.1, kd_weight=0.9, temperature=4.0, alpha=None, beta=None, warmup_fraction=0.0),
             "dkd": dict(ce_weight=1.0, kd_weight=1.0, temperature=4.0, alpha=1.0, beta=8.0, warmup_fraction=20 / 240),
             "nkd": dict(ce_weight=1.0, kd_weight=1.0, temperature=4.0, alpha=None, beta=None, gamma=8.0,
                         nkd_classes="all", warmup_fraction=20 / 240)}


def make_sdd(base, w_s, b_s, w_t, b_t, student_shape, teacher_shape, **overrides):
    from kd.losses.sdd import ScaleDecoupledKD
    args = {**BASE_ARGS[base], "scales": [1, 2, 4], "complementary_weight": 2.0, **overrides}
    shapes = {"student": {"classifier_map": tuple(student_shape)}, "teacher": {"classifier_map": tuple(teacher_shape)}}
    student, teacher = ClassifierHead(w_s, b_s), ClassifierHead(w_t, b_t)
    loss = ScaleDecoupledKD(base=base, **args, features=FEATURES, feature_shapes=shapes, student_model=student,
                            student_taps=TAPS, teacher_model=teacher, teacher_taps=TAPS)
    return loss, student


def random_case(seed, batch=6, classes=5, student=(16, 8, 8), teacher=(24, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    f_s, f_t = torch.randn(batch, *student, generator=g), torch.randn(batch, *teacher, generator=g)
    w_s, w_t = torch.randn(classes, student[0], generator=g) / 2, torch.randn(classes, teacher[0], generator=g) / 2
    b_s, b_t = torch.randn(classes, generator=g), torch.randn(classes, generator=g)
    return f_s, f_t, w_s, b_s, w_t, b_t, torch.randint(classes, (batch,), generator=g)


def np_kd(zs, zt, T):
    """T^2 KL(p_t || p_s) of one row, by a sum over classes."""
    ls, lt = np_log_softmax(zs[None] / T)[0], np_log_softmax(zt[None] / T)[0]
    return T * T * sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(len(zs)))


def np_dkd(zs, zt, g, T, alpha, beta):
    """alpha TCKD + beta NCKD of one row, T^2-scaled: binary KL on [p_gt, 1 - p_gt], KL of the renormalised others."""
    ps, pt = np.exp(np_log_softmax(zs[None] / T)[0]), np.exp(np_log_softmax(zt[None] / T)[0])
    bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
    tckd = sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2))
    others = [c for c in range(len(zs)) if c != g]
    hs, ht = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
    nckd = sum(ht[k] * math.log(ht[k] / hs[k]) for k in range(len(others)))
    return T * T * (alpha * tckd + beta * nckd)


def np_nkd(zs, zt, g, T, gamma, classes):
    """-T_y log S_y + gamma * N of one row (T, S at temperature 1). non_target, NKD's paper (Yang et al., ICCV 2023,
    eq. 8): N = -T^2 sum_{c != y} N(T^T)_c log N(S^T)_c, each distribution renormalised over the non-target classes;
    all, the SDD authors' released form: N = -T^2 sum over every class of p_t,c log p_s,c at temperature T."""
    ps, pt = np.exp(np_log_softmax(zs[None])[0]), np.exp(np_log_softmax(zt[None])[0])
    ps_T, pt_T = np.exp(np_log_softmax(zs[None] / T)[0]), np.exp(np_log_softmax(zt[None] / T)[0])
    target = -pt[g] * math.log(ps[g])
    if classes == "all":
        return target - gamma * T * T * sum(pt_T[c] * math.log(ps_T[c]) for c in range(len(zs)))
    others = [c for c in range(len(zs)) if c != g]
    ns, nt = ps_T[others] / ps_T[others].sum(), pt_T[others] / pt_T[others].sum()
    return target - gamma * T * T * sum(nt[k] * math.log(ns[k]) for k in range(len(others)))


def np_base(zs, zt, g, base, T, args):
    if base == "kd":
        return np_kd(zs, zt, T)
    if base == "dkd":
        return np_dkd(zs, zt, g, T, args["alpha"], args["beta"])
    return np_nkd(zs, zt, g, T, args["gamma"], args["nkd_classes"])


def paper_sdd(f_s, f_t, w_s, b_s, w_t, b_t, y, scales, base, T, args, complementary_weight):
    """L_SDD by loops: every sample's every m x m cell (block means of the map), its local logits by the network's
    classifier, the teacher's local prediction against its global one, the base loss (its weights in `args`) weighted
    1 or complementary_weight, averaged over regions and samples."""
    f_s, f_t, w_s, b_s, w_t, b_t, y = (a.numpy() for a in (f_s, f_t, w_s, b_s, w_t, b_t, y))
    terms = []
    for i in range(len(y)):
        global_right = np.argmax(w_t @ f_t[i].mean((1, 2)) + b_t) == y[i]
        for m in scales:
            for row in range(m):
                for col in range(m):
                    cell = lambda f: f[:, row * (f.shape[1] // m):(row + 1) * (f.shape[1] // m),  # noqa: E731
                                       col * (f.shape[2] // m):(col + 1) * (f.shape[2] // m)].mean((1, 2))
                    zs, zt = w_s @ cell(f_s[i]) + b_s, w_t @ cell(f_t[i]) + b_t
                    loss = np_base(zs, zt, y[i], base, T, args)
                    weight = 1.0 if (np.argmax(zt) == y[i]) == global_right else complementary_weight
                    terms.append(weight * loss)
    return np.mean(terms)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("scales", [[1, 2, 4], [1, 2], [2, 4], [1]])
@pytest.mark.parametrize("base,nkd_classes", [("kd", None), ("dkd", None), ("nkd", "all"), ("nkd", "non_target")])
def test_sd_kd_sd_dkd_and_sd_nkd_against_loops_over_the_papers_regions(base, nkd_classes, scales):
    f_s, f_t, w_s, b_s, w_t, b_t, y = random_case(1)
    args = {**BASE_ARGS[base], **({"nkd_classes": nkd_classes} if nkd_classes else {})}
    loss, _ = make_sdd(base, w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:], scales=scales, complementary_weight=3.0,
                       **args)
    zs = torch.randn(6, 5)
    parts = loss(outputs(zs, classifier_map=f_s), outputs(torch.randn(6, 5), classifier_map=f_t), make_batch(y))
    expected = paper_sdd(f_s, f_t, w_s, b_s, w_t, b_t, y, scales, base, 4.0, args, 3.0)
    assert parts.terms["sdd"].item() == pytest.approx(expected, rel=1e-10)
    assert parts.distillation.item() == pytest.approx(args["kd_weight"] * expected, rel=1e-10)  # outside training
    assert parts.task.item() == pytest.approx(args["ce_weight"] * np_ce(zs.numpy(), y.numpy()), rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_sd_kd_weights_complementary_regions_and_only_those():
    """The cases have complementary regions (the teacher's local and global predictions disagree about the label),
    so the weight changes the value; with weight 1 SD-KD no longer reads the labels at all."""
    f_s, f_t, w_s, b_s, w_t, b_t, y = random_case(2)
    values = {}
    for weight in (1.0, 2.0, 5.0):
        loss, _ = make_sdd("kd", w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:], complementary_weight=weight)
        for labels in (y, (y + 1) % 5):
            values[weight, labels is y] = loss(outputs(torch.zeros(6, 5), classifier_map=f_s),
                                               outputs(torch.zeros(6, 5), classifier_map=f_t),
                                               make_batch(labels)).terms["sdd"].item()
    assert values[1.0, True] == pytest.approx(values[1.0, False], rel=1e-12)
    assert values[1.0, True] < values[2.0, True] < values[5.0, True]
    # linear in the weight: L(w) = consistent part + w * complementary part
    assert values[5.0, True] - values[2.0, True] == pytest.approx(3 * (values[2.0, True] - values[1.0, True]), rel=1e-9)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("base", ["kd", "dkd", "nkd"])
def test_sd_scales_1_is_the_base_loss_on_the_logits_of_the_pooled_map(base):
    """One region per sample, the whole map: SDD is then KD (WeightedKD) or DKD on the classifier's logits, as the
    authors' M = [1] falls back to; SD-NKD with nkd_classes non_target is this project's NKD (kd.losses.nkd), NKD's
    paper (the authors' M = [1] fallback, nkd_loss_origin, is in tests/fixtures/sdd_nkd_reference.json)."""
    from kd.losses.dkd import DKD
    from kd.losses.kd import WeightedKD
    from kd.losses.nkd import NKD
    f_s, f_t, w_s, b_s, w_t, b_t, y = random_case(3)
    overrides = {"nkd_classes": "non_target"} if base == "nkd" else {}
    loss, _ = make_sdd(base, w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:], scales=[1], **overrides)
    z_s, z_t = F.linear(f_s.mean((2, 3)), w_s, b_s), F.linear(f_t.mean((2, 3)), w_t, b_t)
    args = BASE_ARGS[base]
    plain = {"kd": lambda: WeightedKD(4.0, args["ce_weight"], args["kd_weight"], False),
             "dkd": lambda: DKD(args["ce_weight"], 1.0, 8.0, 4.0, args["warmup_fraction"], False),
             "nkd": lambda: NKD(args["ce_weight"], 8.0, 4.0)}[base]()
    ours = loss(outputs(z_s, classifier_map=f_s), outputs(z_t, classifier_map=f_t), make_batch(y))
    theirs = plain(outputs(z_s), outputs(z_t), make_batch(y))
    assert ours.distillation.item() == pytest.approx(theirs.distillation.item(), rel=1e-10)
    assert ours.task.item() == pytest.approx(theirs.task.item(), rel=1e-12)


@pytest.mark.usefixtures("float64")
def test_sd_dkd_and_sd_nkd_warm_up_the_whole_term_and_sd_kd_not_at_all():
    f_s, f_t, w_s, b_s, w_t, b_t, y = random_case(4)
    for base, factor in (("dkd", 0.5 / 20), ("nkd", 0.5 / 20), ("kd", 1.0)):
        loss, _ = make_sdd(base, w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:])
        step = lambda progress: loss(outputs(torch.zeros(6, 5), classifier_map=f_s),  # noqa: E731
                                     outputs(torch.zeros(6, 5), classifier_map=f_t), make_batch(y, progress=progress))
        full, early = step(None), step(Progress(0, 4, 10, 240))  # half of the first of 240 epochs
        assert early.distillation.item() == pytest.approx(factor * full.distillation.item(), rel=1e-12)
        assert early.task.item() == full.task.item() and early.terms["sdd"].item() == full.terms["sdd"].item()


def fixture_loss(expected, **overrides):
    """(the SDD term, the student's map, the student) on a fixture case's inputs, its backward done."""
    f_s, f_t, w_s, b_s, w_t, b_t, labels = classifier_fixture_inputs(expected["inputs"])
    weights = {k: expected[k] for k in ("alpha", "beta", "gamma") if k in expected}
    loss, student = make_sdd(expected["base"], w_s, b_s, w_t, b_t, f_s.shape[1:], f_t.shape[1:],
                             scales=json.loads(expected["M"]), temperature=expected["temperature"], **weights,
                             **overrides)
    f_s.requires_grad_(True)
    zeros = torch.zeros(len(labels), w_s.shape[0])
    sdd = loss(outputs(zeros, classifier_map=f_s), outputs(zeros, classifier_map=f_t), make_batch(labels)).terms["sdd"]
    sdd.backward()
    return sdd.item(), f_s, student


def assert_matches_fixture(reference, expected):
    value, f_s, student = fixture_loss(expected)
    probe_seed = int(reference["gradient_summary"].rsplit("probe_seed ", 1)[1])
    assert value == pytest.approx(expected["value"], rel=1e-12)
    assert_gradient_summary(f_s.grad, expected["gradient_wrt_student_features"], probe_seed)
    assert_gradient_summary(student.fc.weight.grad, expected["gradient_wrt_student_classifier_weight"], probe_seed)
    assert_gradient_summary(student.fc.bias.grad, expected["gradient_wrt_student_classifier_bias"], probe_seed)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", range(4))
def test_sd_kd_and_sd_dkd_match_the_authors_code(case):
    """Fixture: the authors' SPP, local logits, sdd_kd_loss / multi_dkd, run by /tmp/ref_sdd.py on seeded float64
    maps and classifiers (complementary regions present in every case): value and gradients."""
    reference = json.loads(FIXTURE.read_text())
    assert reference["cases"][case]["complementary_regions"] > 0
    assert_matches_fixture(reference, reference["cases"][case])


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", range(4))
def test_sd_nkd_matches_the_authors_code(case):
    """Fixture: the authors' SPP, local logits and multi_nkd_loss (for M [1], as their SDD_NKDLoss, nkd_loss_origin
    on the network's logits), exec'd from their repository by /tmp/ref_sdd_nkd/make.py on seeded float64 maps and
    classifiers (complementary regions in every multi-scale case): value and gradients, the default nkd_classes."""
    reference = json.loads(NKD_FIXTURE.read_text())
    expected = reference["cases"][case]
    assert expected["base"] == "nkd" and (expected["complementary_regions"] > 0) == (expected["M"] != "[1]")
    assert_matches_fixture(reference, expected)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("case", range(4))
def test_sd_nkd_non_target_option_is_not_what_the_authors_ran(case):
    """The authors' nkd_loss keeps every column in its non-target term (its mask is all ones): NKD's paper form, over
    the classes other than the label and renormalised, misses their value by far more than rounding."""
    reference = json.loads(NKD_FIXTURE.read_text())
    expected = reference["cases"][case]
    value, _, _ = fixture_loss(expected, nkd_classes="non_target")
    assert abs(value - expected["value"]) > 0.05 * expected["value"]


@pytest.mark.usefixtures("float64")
def test_sd_nkd_released_second_term_is_the_label_split_plus_the_scaled_non_target_term(logits_batch):
    """Per row, with q = softmax(z / T): -T^2 sum_c q_t,c log q_s,c = T^2 * CE([q_t,y, 1 - q_t,y], [q_s,y, 1 - q_s,y])
    + (1 - q_t,y) * (the paper's renormalised non-target term), since q_c = (1 - q_y) N(q)_c for c != y: the released
    form adds the label's column and shrinks the paper's term by the teacher's non-target mass."""
    from kd.losses.sdd import nkd_per_row
    zs, zt, y = logits_batch
    T = 4.0
    target_all, every = nkd_per_row(zs, zt, y, T, "all")
    target_paper, paper = nkd_per_row(zs, zt, y, T, "non_target")
    qs, qt = np.exp(np_log_softmax(zs.numpy() / T)), np.exp(np_log_softmax(zt.numpy() / T))
    rows = np.arange(len(y))
    s_y, t_y = qs[rows, y.numpy()], qt[rows, y.numpy()]
    binary = -T * T * (t_y * np.log(s_y) + (1 - t_y) * np.log(1 - s_y))
    np.testing.assert_allclose(every.numpy(), binary + (1 - t_y) * paper.numpy(), rtol=1e-10)
    assert torch.equal(target_all, target_paper)
    assert not np.allclose(every.numpy(), paper.numpy(), rtol=1e-2)


# ---------------------------------------------------------------- real networks, as a run builds them

def networks(method, teacher, student, *overrides):
    cfg = compose_config([*TINY, f"method={method}", f"model@model.teacher={teacher}", f"model@model.student={student}",
                          *overrides])
    torch.manual_seed(0)
    teacher_model = instantiate(cfg.model.teacher.arch).eval().requires_grad_(False)
    return run.build_networks(cfg, run.prepare(cfg), teacher_model, torch.arange(50) % 10)


PAIRS = [("resnet20", "smallnet", "stage3", "layer3"), ("resnet18", "smallnet", "stage3", "layer4"),
         ("resnet18", "mobilenetv2", "conv2", "layer4"), ("resnet20", "mobilenetv2", "conv2", "layer3")]


@pytest.mark.parametrize("method", ["sd_kd", "sd_dkd", "sd_nkd"])
@pytest.mark.parametrize("teacher_arch,student_arch,student_map,teacher_map", PAIRS)
def test_sd_methods_read_the_map_each_classifier_pools_and_train_the_students_classifier(
        method, teacher_arch, student_arch, student_map, teacher_map):
    """MobileNetV2's classifier pools its head (conv2, 1280x2x2), not its last stage: the tap follows `head` where a
    model has one, and the 1x1 region's logits are the network's logits. The student's classifier gets a gradient
    through the SDD term, yet the loss holds no parameter and no state of its own."""
    student, teacher, loss = networks(method, teacher_arch, student_arch, "method.loss.ce_weight=0")
    assert student.taps["classifier_map"] == student_map and teacher.taps["classifier_map"] == teacher_map
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        t = teacher.eval()(images)
    s = student.train()(images)
    for out, role in ((s, "student"), (t, "teacher")):
        cells, whole = loss.region_logits(out.features["classifier_map"], role)
        assert cells.shape == (21 * 4, 10)
        assert torch.allclose(cells[:4], out.logits, atol=1e-5) and torch.allclose(whole, out.logits, atol=1e-5)
    parts = loss(s, t, make_batch(torch.arange(4) % 10))
    assert parts.task.item() == 0 and parts.terms["sdd"].item() > 0
    parts.distillation.backward()
    student_fc = loss.classifiers.student_layer
    assert student_fc is student.model.get_submodule({"smallnet": "fc", "mobilenetv2": "classifier.0"}[student_arch])
    assert student_fc.weight.grad.abs().sum() > 0 and student_fc.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    assert not {p.data_ptr() for p in student.parameters()} & {b.data_ptr() for b in loss.buffers()}
    assert "1 + 4 + 16 = 21 regions" in loss.scale_note()


def test_sd_arguments_that_do_not_fit_the_base_are_refused():
    from kd.losses.sdd import ScaleDecoupledKD
    common = dict(ce_weight=1.0, kd_weight=1.0, temperature=4.0, complementary_weight=2.0, warmup_fraction=0.0,
                  features=FEATURES, feature_shapes=None, student_model=None, student_taps=TAPS, teacher_model=None,
                  teacher_taps=TAPS)
    with pytest.raises(ValueError, match=r"base 'crd' is not one of \['kd', 'dkd', 'nkd'\]"):
        ScaleDecoupledKD(base="crd", alpha=None, beta=None, scales=[1, 2], **common)
    with pytest.raises(ValueError, match="set both for base 'dkd', both null for bases 'kd' and 'nkd'"):
        ScaleDecoupledKD(base="kd", alpha=1.0, beta=8.0, scales=[1, 2], **common)
    with pytest.raises(ValueError, match="set both for base 'dkd'"):
        ScaleDecoupledKD(base="nkd", alpha=1.0, beta=8.0, gamma=8.0, nkd_classes="all", scales=[1, 2], **common)
    with pytest.raises(ValueError, match="gamma and nkd_classes .* set both for base 'nkd'"):
        ScaleDecoupledKD(base="nkd", alpha=None, beta=None, gamma=8.0, scales=[1, 2], **common)
    with pytest.raises(ValueError, match="both null for bases 'kd' and 'dkd'"):
        ScaleDecoupledKD(base="dkd", alpha=1.0, beta=8.0, gamma=8.0, nkd_classes="all", scales=[1, 2], **common)
    with pytest.raises(ValueError, match=r"nkd_classes 'target' is not one of \['all', 'non_target'\]"):
        ScaleDecoupledKD(base="nkd", alpha=None, beta=None, gamma=8.0, nkd_classes="target", scales=[1, 2], **common)
    with pytest.raises(ValueError, match="set both for base 'dkd'"):
        ScaleDecoupledKD(base="dkd", alpha=1.0, beta=None, scales=[1, 2], **common)
    with pytest.raises(ValueError, match=r"scales \[1, 2.5\] must be a list of whole numbers"):
        ScaleDecoupledKD(base="kd", alpha=None, beta=None, scales=[1, 2.5], **common)
