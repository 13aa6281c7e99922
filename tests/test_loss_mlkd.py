import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, compose_config, run_train
from reference import (cross_entropy as np_ce, evaluate, log_softmax as np_log_softmax, outputs,
                       scaled_logit_fixture_inputs, softmax as np_softmax)

pytestmark = pytest.mark.usefixtures("float64")
TEMPERATURES = [4.0, 3.0, 5.0, 2.0, 6.0]
FIXTURE = Path(__file__).parent / "fixtures" / "mlkd_reference.json"


def _mlkd(mask_percentile=50.0, temperatures=TEMPERATURES, masking="released", standardize=False, kd_weight=0.9,
          **entropy_aware):
    from kd.losses.mlkd import MLKD
    return MLKD(temperatures=temperatures, mask_percentile=mask_percentile, masking=masking, ce_weight=0.1,
                kd_weight=kd_weight, standardize=standardize, **entropy_aware)


def np_zscore(z):
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


def np_terms(zs, zt, percentile=50.0, temperatures=TEMPERATURES, masking="released", standardize=False,
             sample_weights=None):
    """The three levels written out with loops, masks from numpy.percentile as in KD_ours.py. released: each
    level's unmasked sum scaled by the kept fraction of its mask; per_sample: only the kept samples' (classes')
    entries summed. standardize: the instance level on z-scored logits (LS's MLKD.py); sample_weights: an extra
    per-sample factor on the instance level (EA-MLD)."""
    B, C = zs.shape
    ks, kt = (np_zscore(zs), np_zscore(zt)) if standardize else (zs, zt)
    extra = np.ones(B) if sample_weights is None else np.asarray(sample_weights)
    p1 = np_softmax(zt)
    confidence, class_mass = p1.max(1), p1.sum(0)
    keep = confidence <= np.percentile(confidence, percentile)
    keep_class = class_mass <= np.percentile(class_mass, percentile)
    w = np.full(B, keep.mean()) if masking == "released" else keep.astype(float)
    u = np.full(C, keep_class.mean()) if masking == "released" else keep_class.astype(float)
    instance = batch = klass = 0.0
    for T in temperatures:
        ps, pt = np_softmax(zs / T), np_softmax(zt / T)
        ls, lt = np_log_softmax(ks / T), np_log_softmax(kt / T)
        instance += sum(extra[i] * w[i] * T * T * sum(math.exp(lt[i, c]) * (lt[i, c] - ls[i, c]) for c in range(C))
                        for i in range(B)) / B
        for i in range(B):
            for j in range(B):
                gt = sum(pt[i, c] * pt[j, c] for c in range(C))
                gs = sum(ps[i, c] * ps[j, c] for c in range(C))
                batch += w[j] * (gt - gs) ** 2 / B
        for a in range(C):
            for b in range(C):
                mt = sum(pt[i, a] * pt[i, b] for i in range(B))
                ms = sum(ps[i, a] * ps[i, b] for i in range(B))
                klass += u[b] * (mt - ms) ** 2 / C
    return instance, batch, klass, keep, keep_class


@pytest.mark.parametrize("masking", ["released", "per_sample"])
@pytest.mark.parametrize("percentile", [50.0, 100.0, 30.0])
def test_mlkd_against_loops(logits_batch, percentile, masking):
    zs, zt, y = logits_batch
    instance, batch, klass, keep, keep_class = np_terms(zs.numpy(), zt.numpy(), percentile, masking=masking)
    total, terms = evaluate(_mlkd(percentile, masking=masking), outputs(zs), outputs(zt), y)
    assert terms["instance"].item() == pytest.approx(instance, rel=1e-10)
    assert terms["batch"].item() == pytest.approx(batch, rel=1e-10)
    assert terms["class"].item() == pytest.approx(klass, rel=1e-10)
    expected = 0.1 * np_ce(zs.numpy(), y.numpy()) + 0.9 * (instance + batch + klass)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    if percentile == 50.0:  # the median keeps half of 6 distinct confidences and half of 10 class masses
        assert keep.sum() == 3 and keep_class.sum() == 5
    if percentile == 100.0:
        assert keep.all() and keep_class.all()


def test_masks_keep_the_teachers_less_confident_samples_and_classes():
    loss = _mlkd()
    zt = torch.tensor([[9.0, 0, 0], [0, 1.0, 0], [0, 0, 5.0], [0.5, 0, 0]])  # top probabilities: high, low, high, low
    samples, classes = loss.masks(zt)
    assert samples.tolist() == [0, 1, 0, 1]
    mass = torch.softmax(zt, 1).sum(0)
    assert classes.tolist() == (mass <= mass.median()).double().tolist() and classes.sum() == 2


def test_masking_released_matches_the_released_code_with_masks_active():
    """Fixture: the weak-view terms of KD_ours.forward_train (Jin-Ying/Multi-Level-Logit-Distillation) on seeded
    logits, half the samples and half the classes masked: value, each level, and the gradient."""
    reference = json.loads(FIXTURE.read_text())
    zs, zt, y = scaled_logit_fixture_inputs(reference["inputs"])
    loss = _mlkd()
    samples, classes = loss.masks(zt)
    assert samples.bool().tolist() == reference["sample_mask"] and classes.bool().tolist() == reference["class_mask"]
    assert 0 < samples.mean() < 1 and 0 < classes.mean() < 1
    expected_gradient = np.array(reference["gradient_wrt_student_logits"])

    def value_and_gradient(loss):
        z = zs.clone().requires_grad_()
        total, terms = evaluate(loss, outputs(z), outputs(zt), y)
        total.backward()
        return total.item(), terms, z.grad.flatten().numpy()

    total, terms, gradient = value_and_gradient(loss)
    assert total == pytest.approx(reference["value"], rel=1e-12)
    for name in ("instance", "batch", "class", "ce"):
        assert terms[name].item() == pytest.approx(reference["terms"][name], rel=1e-12)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-14)
    # selecting samples instead: the total 24% below the released code's, the gradient 97% off
    total, _, gradient = value_and_gradient(_mlkd(masking="per_sample"))
    assert total == pytest.approx(0.756 * reference["value"], rel=1e-2)
    assert np.linalg.norm(gradient - expected_gradient) > 0.9 * np.linalg.norm(expected_gradient)


def test_released_masking_scales_each_unmasked_level_by_the_kept_fraction(logits_batch):
    zs, zt, y = logits_batch
    samples, classes = _mlkd().masks(zt)
    _, released = evaluate(_mlkd(), outputs(zs), outputs(zt), y)
    _, unmasked = evaluate(_mlkd(100.0), outputs(zs), outputs(zt), y)
    for name, kept in (("instance", samples.mean()), ("batch", samples.mean()), ("class", classes.mean())):
        assert released[name].item() == pytest.approx(kept.item() * unmasked[name].item(), rel=1e-12)
    assert samples.mean().item() == 0.5 and classes.mean().item() == 0.5


def test_per_sample_masking_ignores_samples_the_mask_drops_in_the_instance_term(logits_batch):
    zs, zt, y = logits_batch
    loss = _mlkd(masking="per_sample")
    dropped = int(torch.nonzero(loss.masks(zt)[0] == 0)[0])
    moved = zs.clone()
    moved[dropped] = torch.randn(10) * 5
    _, before = evaluate(loss, outputs(zs), outputs(zt), y)
    _, after = evaluate(loss, outputs(moved), outputs(zt), y)
    assert after["instance"].item() == pytest.approx(before["instance"].item(), rel=1e-12)
    assert after["batch"].item() != pytest.approx(before["batch"].item())  # its correlations with kept samples count


def test_an_unknown_masking_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"masking 'mean' is not one of \['released', 'per_sample'\]"):
        _mlkd(masking="mean")


def test_every_level_vanishes_when_student_equals_teacher(logits_batch):
    zs, _, y = logits_batch
    _, terms = evaluate(_mlkd(100.0), outputs(zs), outputs(zs.clone()), y)
    assert all(abs(terms[k].item()) < 1e-14 for k in ("instance", "batch", "class"))


def test_invariant_to_adding_a_constant_to_each_row(logits_batch):
    zs, zt, y = logits_batch
    shift_s, shift_t = torch.randn(6, 1) * 10, torch.randn(6, 1) * 10
    _, terms = evaluate(_mlkd(), outputs(zs), outputs(zt), y)
    _, shifted = evaluate(_mlkd(), outputs(zs + shift_s), outputs(zt + shift_t), y)
    for k in ("instance", "batch", "class"):
        assert shifted[k].item() == pytest.approx(terms[k].item(), rel=1e-9)


def test_correlation_levels_are_symmetric_in_student_and_teacher_when_nothing_is_masked(logits_batch):
    zs, zt, y = logits_batch
    _, forward = evaluate(_mlkd(100.0), outputs(zs), outputs(zt), y)
    _, swapped = evaluate(_mlkd(100.0), outputs(zt), outputs(zs), y)
    for k in ("batch", "class"):
        assert swapped[k].item() == pytest.approx(forward[k].item(), rel=1e-12)


def test_one_temperature_without_masks_is_vanilla_kd_plus_the_two_correlation_terms(logits_batch):
    zs, zt, y = logits_batch
    T = 4.0
    _, terms = evaluate(_mlkd(100.0, [T]), outputs(zs), outputs(zt), y)
    ps, pt = np_softmax(zs.numpy() / T), np_softmax(zt.numpy() / T)
    kl = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(10)) for i in range(6)])
    assert terms["instance"].item() == pytest.approx(T * T * kl, rel=1e-10)
    assert terms["batch"].item() == pytest.approx(np.sum((pt @ pt.T - ps @ ps.T) ** 2) / 6, rel=1e-10)
    assert terms["class"].item() == pytest.approx(np.sum((pt.T @ pt - ps.T @ ps) ** 2) / 10, rel=1e-10)


# ---------------------------------------------------------------- standardize (LS) and entropy_aware (EA-MLD)

@pytest.mark.parametrize("masking", ["released", "per_sample"])
def test_standardize_z_scores_the_instance_terms_only(logits_batch, masking):
    """LS's MLKD.py standardises inside kd_loss only: the correlation terms and the masks keep the raw logits."""
    zs, zt, y = logits_batch
    instance, batch, klass, _, _ = np_terms(zs.numpy(), zt.numpy(), masking=masking, standardize=True)
    _, terms = evaluate(_mlkd(masking=masking, standardize=True), outputs(zs), outputs(zt), y)
    assert terms["instance"].item() == pytest.approx(instance, rel=1e-9)
    assert terms["batch"].item() == pytest.approx(batch, rel=1e-10)
    assert terms["class"].item() == pytest.approx(klass, rel=1e-10)
    _, raw = evaluate(_mlkd(masking=masking), outputs(zs), outputs(zt), y)
    assert terms["instance"].item() != pytest.approx(raw["instance"].item(), rel=1e-3)
    assert terms["ce"].item() == raw["ce"].item()


LS_MLKD_REFERENCE = {"instance": 2.248426339426664, "batch": 0.05962417278857498, "class": 0.14292285724113513}
"""sunshangquan/logit-standardization-KD @f6e5aa5172bad618e801163c3385322eea673754, mdistiller/distillers/MLKD.py, run
outside the project in float64 (torch 2.14.1) on tests/fixtures/mlkd_reference.json's inputs: the weak-view sums over
T = 2, 3, 5, 2, 6 (KD.TEMPERATURE = --base-temp 2) of (kd_loss(z_s, z_t, T, logit_stand=True) * mask).mean(),
(bc_loss * mask).mean() and (cc_loss * class_conf_mask).mean(), unweighted; forward_train's own loss_kd (less its
strong view), loss_bc and loss_cc agreed within 2.1e-16."""


def test_mlkd_ls_matches_the_ls_authors_mlkd():
    reference = json.loads(FIXTURE.read_text())
    zs, zt, y = scaled_logit_fixture_inputs(reference["inputs"])
    temperatures = list(compose_config(["method=mlkd_ls"]).method.loss.temperatures)
    _, terms = evaluate(_mlkd(temperatures=temperatures, standardize=True, kd_weight=9.0), outputs(zs), outputs(zt), y)
    for name, value in LS_MLKD_REFERENCE.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-12)


def test_mlkd_ls_is_the_ls_recipe_on_mlkd():
    mlkd, mlkd_ls = (compose_config([f"method={m}"]) for m in ("mlkd", "mlkd_ls"))
    loss = mlkd_ls.method.loss
    assert list(loss.temperatures) == [2.0, 3.0, 5.0, 2.0, 6.0]
    assert loss.standardize and not mlkd.method.loss.standardize
    assert (loss.ce_weight, loss.kd_weight) == (0.1, 9.0)
    assert (loss.mask_percentile, loss.masking) == (mlkd.method.loss.mask_percentile, mlkd.method.loss.masking)
    assert mlkd_ls.optim.optimizer.lr == mlkd.optim.optimizer.lr == 0.025


@pytest.mark.parametrize("masking", ["released", "per_sample"])
def test_entropy_aware_weights_each_samples_instance_terms(logits_batch, masking):
    """EA-MLD: the instance level's per-sample factor times w_EA = H_t (1 + H_s / log C) / 2 at T' = 3; the correlation
    levels unchanged."""
    zs, zt, y = logits_batch
    ps, pt = np_softmax(zs.numpy() / 3.0), np_softmax(zt.numpy() / 3.0)
    h_s, h_t = -(ps * np.log(ps)).sum(1), -(pt * np.log(pt)).sum(1)
    w = h_t * (1 + h_s / math.log(10)) / 2
    instance, batch, klass, _, _ = np_terms(zs.numpy(), zt.numpy(), masking=masking, sample_weights=w)
    loss = _mlkd(masking=masking, entropy_aware=True, entropy_temperature=3.0, entropy_bound=None)
    _, terms = evaluate(loss, outputs(zs), outputs(zt), y)
    assert terms["instance"].item() == pytest.approx(instance, rel=1e-10)
    assert terms["batch"].item() == pytest.approx(batch, rel=1e-10)
    assert terms["class"].item() == pytest.approx(klass, rel=1e-10)
    assert terms["entropy_weight"].item() == pytest.approx(w.mean(), rel=1e-12)


# ---------------------------------------------------------------- the strong view (the released total)

class StandIn(torch.nn.Module):
    """A network that returns the given logits, whatever it is shown, and records what it saw and whether gradients
    were on: the strong view's logits of the reference fixture, fed through MLKD's own forward."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen, self.grad_enabled = logits, [], []

    def forward(self, images):
        self.seen.append(images)
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.logits


def strong_inputs(recipe):
    g = torch.Generator().manual_seed(recipe["seed"])
    zs = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    zt = torch.randn(recipe["batch"], recipe["classes"], generator=g, dtype=torch.float64) * recipe["scale"]
    assert zs.sum().item() == pytest.approx(recipe["check"]["student_sum"], rel=1e-12)
    assert zt.sum().item() == pytest.approx(recipe["check"]["teacher_sum"], rel=1e-12)
    return zs, zt


def images_on_the_8_bit_grid(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g).double() / 255


def configured_mlkd(method, student, teacher, **changes):
    """The loss as the method's YAML builds it (every argument from the composed config), with the given networks."""
    from omegaconf import OmegaConf

    from kd.losses.mlkd import MLKD
    arguments = OmegaConf.to_container(compose_config([f"method={method}"]).method.loss, resolve=True)
    arguments = {k: v for k, v in arguments.items() if not k.startswith("_")}
    return MLKD(**{**arguments, **changes}, student_model=student, teacher_model=teacher)


EA_KD_BOUND = float(torch.tensor(100.0, dtype=torch.float32).log())
"""EA-KD's KD_ours.py: H_ub = torch.log(torch.tensor(100.0, dtype=torch.float32)), log 100 whatever C (here 10)."""
CASES = {"mlkd": ("mlkd", {}, 1e-12), "mlkd_ls": ("mlkd_ls", {}, 1e-12),
         # EA-KD's entropies read log(p + 1e-10) where the project's are exact: 7e-10 apart on these logits
         "ea_mlkd": ("mlkd", {"entropy_aware": True, "entropy_bound": EA_KD_BOUND}, 1e-8)}


@pytest.mark.parametrize("case", CASES)
def test_the_released_total_with_both_views_matches_the_authors_forward_train(case):
    """Fixture "both_views": the authors' forward_train (KD_ours.py; LS's MLKD.py; EA-KD's KD_ours.py with EA 1) run
    outside the project on seeded weak- and strong-view logits; here the method's own config, its strong view's
    networks replaced by stand-ins returning the fixture's strong logits: the total, each of losses_dict's entries,
    and the gradient wrt the student's logits of each view."""
    reference = json.loads(FIXTURE.read_text())
    both = reference["both_views"]
    expected = both["cases"][case]
    method, changes, rel = CASES[case]
    zs, zt, y = scaled_logit_fixture_inputs(reference["inputs"])
    zs_strong, zt_strong = strong_inputs(both["strong_inputs"])
    zs, zs_strong = zs.clone().requires_grad_(), zs_strong.clone().requires_grad_()
    loss = configured_mlkd(method, StandIn(zs_strong), StandIn(zt_strong), **changes)
    parts = evaluate_parts(loss, zs, zt, y)
    parts.total.backward()
    terms, kd_weight = parts.terms, loss.kd_weight
    losses = expected["losses"]
    assert parts.total.item() == pytest.approx(expected["value"], rel=rel)
    assert parts.task.item() == pytest.approx(losses["loss_ce"], rel=1e-12)
    instance = terms["instance"] + terms["instance_unmasked"] + terms["instance_strong"]
    assert kd_weight * instance.item() == pytest.approx(losses["loss_kd"], rel=rel)
    assert kd_weight * terms["class"].item() == pytest.approx(losses["loss_cc"], rel=1e-12)
    assert kd_weight * terms["batch"].item() == pytest.approx(losses["loss_bc"], rel=1e-12)
    atol = 1e-14 if rel == 1e-12 else 1e-8
    np.testing.assert_allclose(zs.grad.flatten().numpy(), expected["gradient_wrt_student_weak_logits"], rtol=1e-10,
                               atol=atol)
    np.testing.assert_allclose(zs_strong.grad.flatten().numpy(), expected["gradient_wrt_student_strong_logits"],
                               rtol=1e-10, atol=atol)


def evaluate_parts(loss, zs, zt, y):
    from kd.losses.batch import Batch
    return loss(outputs(zs), outputs(zt), Batch(images_on_the_8_bit_grid(len(y)), y, torch.arange(len(y))))


def test_without_the_strong_view_the_released_total_loses_its_strong_terms():
    """The fixture's total less the strong view's (its CE and instance KD): what strong_view false gives, the unmasked
    weak-view terms at T = 2 and 6 staying; and without those too, the weak-view form of the first fixture."""
    reference = json.loads(FIXTURE.read_text())
    zs, zt, y = scaled_logit_fixture_inputs(reference["inputs"])
    zs_strong, zt_strong = strong_inputs(reference["both_views"]["strong_inputs"])
    both = configured_mlkd("mlkd", StandIn(zs_strong), StandIn(zt_strong))
    weak = configured_mlkd("mlkd", None, None, strong_view=False)
    full, partial = evaluate_parts(both, zs, zt, y), evaluate_parts(weak, zs, zt, y)
    strong_part = 0.1 * full.terms["ce_strong"] + 0.9 * full.terms["instance_strong"]
    assert partial.total.item() == pytest.approx((full.total - strong_part).item(), rel=1e-12)
    assert "instance_strong" not in partial.terms and "ce_strong" not in partial.terms
    alone = evaluate_parts(configured_mlkd("mlkd", None, None, strong_view=False, weak_unmasked_temperatures=[]), zs,
                           zt, y)
    assert alone.total.item() == pytest.approx(reference["value"], rel=1e-12)


def test_the_strong_view_is_one_augmented_view_each_network_reads_with_its_own_normalisation():
    zs, zt = torch.randn(8, 10), torch.randn(8, 10)
    student, teacher = StandIn(torch.randn(8, 10, requires_grad=True)), StandIn(torch.randn(8, 10))
    loss = configured_mlkd("mlkd", student, teacher, student_normalization={"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]},
                           teacher_normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    from kd.losses.batch import Batch
    images = images_on_the_8_bit_grid(8)
    parts = loss(outputs(zs), outputs(zt), Batch(images, torch.arange(8) % 10, torch.arange(8)))
    (seen_s,), (seen_t,) = student.seen, teacher.seen
    view_s = seen_s * torch.tensor([1.0, 2, 3]).view(1, 3, 1, 1) + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    view_t = seen_t * 0.25 + 0.5
    torch.testing.assert_close(view_s, view_t)  # one strong view, shown to both
    assert torch.allclose(view_s * 255, (view_s * 255).round(), atol=1e-6) and 0 <= view_s.min() and view_s.max() <= 1
    assert not torch.allclose(view_s, images) and not torch.allclose(view_s, images.flip(-1))  # augmented
    assert student.grad_enabled == [True] and teacher.grad_enabled == [False]  # the teacher without gradients
    assert {"instance_strong", "ce_strong", "instance_unmasked"} <= set(parts.terms)


def test_the_strong_view_needs_its_settings_and_networks():
    from kd.losses.mlkd import MLKD
    base = dict(temperatures=TEMPERATURES, mask_percentile=50.0, masking="released", ce_weight=0.1, kd_weight=0.9,
                standardize=False, strong_view=True, strong_temperatures=[4.0], randaugment_ops=2, cutout=0.5)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(ValueError, match=r"strong_view needs method.loss.\['student_normalization', 'teacher_norm"):
        MLKD(**base, student_model=StandIn(None), teacher_model=StandIn(None))
    with pytest.raises(ValueError, match="needs student_model and teacher_model"):
        MLKD(**base, student_normalization=norm, teacher_normalization=norm)


def test_the_networks_are_not_parts_of_the_loss():
    """Never submodules: the student's parameters stay the student's (not optimised twice, not saved with the loss),
    and the loss's train()/eval() leaves the teacher in eval mode."""
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).eval()
    loss = configured_mlkd("mlkd", student, teacher)
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
    loss.train()
    assert not teacher.training


@pytest.mark.slow
@pytest.mark.parametrize("seed", [42])
def test_an_mlkd_run_with_the_strong_view_learns(tmp_path, seed):
    """The method's own config (strong view on), a ResNet-8 student and a SmallNet teacher trained for 3 epochs (1
    leaves its BatchNorm statistics unsettled): the student learns, also to follow the teacher on the strong views.
    (A SmallNet student learns little in 3 epochs under MLKD's five temperatures, with or without the strong view.)"""
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "method=mlkd", "kd_epochs=3", "data.source.num_train=1000", f"seed={seed}",
                      "model@model.teacher=smallnet", "model@model.student=resnet8",
                      f"model.teacher.ckpt={tmp_path / 'teacher.pt'}", "teacher_training.epochs=3",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    first, last = (results["history"][k]["terms"] for k in (0, -1))
    assert last["ce_strong"] > 0 and last["instance_strong"] > 0  # the strong view ran
    assert last["instance_strong"] < 0.7 * first["instance_strong"]  # the student follows the teacher on it
    assert results["test_acc"] > 0.3  # chance: 0.1
