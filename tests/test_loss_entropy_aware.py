"""EA-KD's per-sample entropy weights (Su et al., ICCV 2025, arXiv:2311.13621; kd/losses/entropy_aware.py) and the
`entropy_aware` switch of the logit losses: the paper's formula in numpy, the authors' released code's numbers
(tests/fixtures/entropy_aware_reference.json), and the switch off leaving every loss as it was."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from kd.losses.batch import Progress
from reference import batch as make_batch, log_softmax as np_log_softmax, outputs, scaled_logit_fixture_inputs

pytestmark = pytest.mark.usefixtures("float64")
FIXTURE = Path(__file__).parent / "fixtures" / "entropy_aware_reference.json"
EA = dict(entropy_aware=True, entropy_temperature=3.0, entropy_bound=100.0)


def np_entropy(z, t):
    log_p = np_log_softmax(np.asarray(z) / t)
    return -(np.exp(log_p) * log_p).sum(1)


def np_weights(zs, zt, t, bound=None):
    """The paper: w_base = H_T, w_interact = H_T * H_S / H_ub, w_EA = (w_base + w_interact) / 2, H_ub = log C."""
    bound = math.log(np.shape(zs)[1]) if bound is None else bound
    h_t, h_s = np_entropy(zt, t), np_entropy(zs, t)
    return (h_t + h_t * h_s / bound) / 2


def np_kl(zs, zt, T):
    """Per-sample KL(softmax(z_t/T) || softmax(z_s/T))."""
    ls, lt = np_log_softmax(np.asarray(zs) / T), np_log_softmax(np.asarray(zt) / T)
    return (np.exp(lt) * (lt - ls)).sum(1)


def losses():
    """One of each loss with the switch, EA off and on (T' 3, H_ub 100)."""
    from kd.losses.ctkd import CTKD
    from kd.losses.dkd import DKD
    from kd.losses.kd import VanillaKD, WeightedKD
    from kd.losses.mlkd import MLKD
    return {
        "VanillaKD": lambda **ea: VanillaKD(4.0, 0.7, False, **ea),
        "WeightedKD": lambda **ea: WeightedKD(2.0, 1.0, 9.0, True, **ea),
        "DKD": lambda **ea: DKD(1.0, 1.0, 8.0, 4.0, 20 / 240, False, **ea),
        "MLKD": lambda **ea: MLKD([4.0, 3.0, 5.0, 2.0, 6.0], 50.0, "released", 0.1, 0.9, False, **ea),
        "CTKD": lambda **ea: CTKD(1.0, 20.0, 1.0, 1.0, 10 / 240, 0.1, 0.9, False, **ea),
    }


@pytest.mark.parametrize("t,bound", [(3.0, 100.0), (3.0, None), (2.0, None), (1.0, 2.5)])
def test_weights_against_the_papers_formula(logits_batch, t, bound):
    from kd.losses.entropy_aware import EntropyWeights, entropy
    zs, zt, _ = logits_batch
    w = EntropyWeights(t, bound)(zs, zt)
    np.testing.assert_allclose(w.numpy(), np_weights(zs.numpy(), zt.numpy(), t, bound), rtol=1e-12)
    np.testing.assert_allclose(entropy(zt, t).numpy(), np_entropy(zt.numpy(), t), rtol=1e-12)


def test_weights_carry_no_gradient_and_lie_in_zero_to_log_c(logits_batch):
    from kd.losses.entropy_aware import EntropyWeights
    zs, zt, _ = logits_batch
    s = zs.clone().requires_grad_()
    w = EntropyWeights(3.0, None)(s, zt)
    assert not w.requires_grad
    assert torch.all(w >= 0) and torch.all(w <= math.log(10))
    uniform, certain = torch.zeros(1, 10), torch.tensor([[50.0] + [0.0] * 9])
    assert EntropyWeights(3.0, None)(uniform, uniform).item() == pytest.approx(math.log(10), rel=1e-12)  # the top
    assert EntropyWeights(3.0, None)(uniform, certain).item() < 1e-5  # a sure teacher: no weight, whatever the student
    # the student's entropy moves w between H_t / 2 and H_t
    assert EntropyWeights(3.0, None)(certain, uniform).item() == pytest.approx(math.log(10) / 2, rel=1e-5)


def test_weights_stay_finite_for_extreme_logits():
    from kd.losses.entropy_aware import EntropyWeights
    z = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    w = EntropyWeights(3.0, None)(z, z.flip(0))
    assert torch.isfinite(w).all()


def test_the_switch_on_without_a_temperature_names_what_to_set():
    from kd.losses.kd import VanillaKD
    with pytest.raises(ValueError, match="VanillaKD: entropy_aware needs method.loss.entropy_temperature"):
        VanillaKD(4.0, 0.7, False, entropy_aware=True)


@pytest.mark.parametrize("name", ["VanillaKD", "WeightedKD", "DKD", "MLKD", "CTKD"])
def test_switched_off_every_loss_is_bit_for_bit_the_same(logits_batch, name):
    zs, zt, y = logits_batch
    make = losses()[name]
    progress = Progress(3, 1, 4, 240)
    default = make()(outputs(zs), outputs(zt), make_batch(y, progress=progress))
    off = make(entropy_aware=False, entropy_temperature=3.0, entropy_bound=100.0)(
        outputs(zs), outputs(zt), make_batch(y, progress=progress))
    assert set(off.terms) == set(default.terms) and "entropy_weight" not in off.terms
    assert torch.equal(off.total, default.total)
    assert all(torch.equal(off.terms[k], default.terms[k]) for k in default.terms)


@pytest.mark.parametrize("name", ["VanillaKD", "WeightedKD", "DKD", "MLKD", "CTKD"])
def test_uniform_weights_give_the_unweighted_loss(logits_batch, name, monkeypatch):
    """With every w_i = 1 the switched-on loss equals the switched-off one: the weights enter only as a per-sample
    factor of the distillation term."""
    from kd.losses import entropy_aware
    zs, zt, y = logits_batch
    monkeypatch.setattr(entropy_aware.EntropyWeights, "__call__", lambda self, s, t: torch.ones(len(s)))
    make = losses()[name]
    on = make(**EA)(outputs(zs), outputs(zt), make_batch(y))
    off = make()(outputs(zs), outputs(zt), make_batch(y))
    assert on.total.item() == pytest.approx(off.total.item(), rel=1e-12)
    assert on.terms["entropy_weight"].item() == 1.0


@pytest.mark.parametrize("name", ["WeightedKD", "DKD", "MLKD", "CTKD"])
def test_the_weights_read_the_raw_logits_also_when_standardized(logits_batch, name):
    from kd.losses.entropy_aware import EntropyWeights
    zs, zt, y = logits_batch
    loss = losses()[name](**EA)
    loss.standardize = True
    parts = loss(outputs(zs), outputs(zt), make_batch(y))
    assert parts.terms["entropy_weight"].item() == pytest.approx(EntropyWeights(3.0, 100.0)(zs, zt).mean().item(),
                                                                rel=1e-14)


# ---------------------------------------------------------------- the authors' code (fixture)

def fixture():
    reference = json.loads(FIXTURE.read_text())
    return (reference, *scaled_logit_fixture_inputs(reference["inputs"]))


def test_weights_match_the_authors_get_w():
    """KD.py's get_w takes log(p + 1e-10), DKD.py's log(clamp(p, 1e-10)); ours is exact: equal to the clamped form,
    within C * 1e-10 / H (here 3e-9) of the other."""
    from kd.losses.entropy_aware import EntropyWeights
    reference, zs, zt, _ = fixture()
    weights = reference["weights"]
    for t, bound, key, rel in [(3.0, 100.0, "dkd_py_bound_100", 1e-13), (3.0, 100.0, "kd_py_bound_100", 1e-8),
                               (3.0, None, "kd_py_bound_log100", 1e-8), (2.0, None, "kd_py_bound_log100_t2", 1e-8)]:
        np.testing.assert_allclose(EntropyWeights(t, bound)(zs, zt).numpy(), weights[key], rtol=rel)


def test_ea_kd_matches_the_authors_kd_with_its_gradient():
    from kd.losses.kd import WeightedKD
    reference, zs, zt, y = fixture()
    student = zs.clone().requires_grad_()
    parts = WeightedKD(4.0, 0.1, 0.9, False, **EA)(outputs(student), outputs(zt), make_batch(y))
    parts.total.backward()
    expected = reference["kd"]
    assert parts.task.item() == pytest.approx(expected["loss_ce"], rel=1e-12)
    assert parts.distillation.item() == pytest.approx(expected["loss_kd"], rel=1e-8)  # their log(p + 1e-10)
    assert parts.total.item() == pytest.approx(expected["total"], rel=1e-8)
    np.testing.assert_allclose(student.grad.flatten().numpy(), expected["gradient_wrt_student_logits"],
                               rtol=1e-6, atol=1e-12)


def test_ea_dkd_matches_the_authors_dkd_with_its_gradient_and_warmup():
    from kd.losses.dkd import DKD
    reference, zs, zt, y = fixture()
    expected = reference["dkd"]
    student = zs.clone().requires_grad_()
    loss = DKD(1.0, 1.0, 8.0, 4.0, 20 / 240, False, **EA)
    parts = loss(outputs(student), outputs(zt), make_batch(y, progress=Progress(19, 0, 1, 240)))  # warm-up done
    parts.total.backward()
    assert parts.task.item() == pytest.approx(expected["loss_ce"], rel=1e-12)
    assert parts.distillation.item() == pytest.approx(expected["loss_kd"], rel=1e-12)
    np.testing.assert_allclose(student.grad.flatten().numpy(), expected["gradient_wrt_student_logits"],
                               rtol=1e-10, atol=1e-15)
    half = loss(outputs(zs), outputs(zt), make_batch(y, progress=Progress(9, 0, 1, 240)))  # their epoch 10 of 20
    assert half.distillation.item() == pytest.approx(expected["loss_kd_epoch_10"], rel=1e-12)


def test_ea_mlkd_matches_the_authors_kd_ours_weak_view():
    from kd.losses.mlkd import MLKD
    reference, zs, zt, y = fixture()
    expected = reference["mlkd"]
    loss = MLKD([4.0, 3.0, 5.0, 2.0, 6.0], 50.0, "released", 0.1, 0.9, False, entropy_aware=True,
                entropy_temperature=3.0, entropy_bound=None)  # KD_ours.py: H_ub = log(100)
    samples, classes = loss.masks(zt)
    assert samples.bool().tolist() == expected["sample_mask"] and classes.bool().tolist() == expected["class_mask"]
    terms = loss(outputs(zs), outputs(zt), make_batch(y)).terms
    assert terms["instance"].item() == pytest.approx(expected["instance"], rel=1e-7)  # their log(p + 1e-10)
    assert terms["batch"].item() == pytest.approx(expected["batch"], rel=1e-12)
    assert terms["class"].item() == pytest.approx(expected["class"], rel=1e-12)
    assert terms["ce"].item() == pytest.approx(expected["ce"], rel=1e-12)


# ---------------------------------------------------------------- configs

def test_the_named_configs_switch_it_on_with_the_authors_settings():
    kd_ea, dkd_ea = (compose_config([f"method={m}"]).method.loss for m in ("kd_ea", "dkd_ea"))
    for loss in (kd_ea, dkd_ea):
        assert (loss.entropy_aware, loss.entropy_temperature, loss.entropy_bound) == (True, 3.0, 100.0)
        assert loss.temperature == 4.0 and not loss.standardize
    assert (kd_ea.ce_weight, kd_ea.kd_weight) == (0.1, 0.9)
    assert (dkd_ea.ce_weight, dkd_ea.alpha, dkd_ea.beta) == (1.0, 1.0, 8.0)
    assert dkd_ea.warmup_fraction == compose_config(["method=dkd"]).method.loss.warmup_fraction
    for method in ("kd", "dkd", "mlkd", "ctkd", "mlkd_ls", "ctkd_ls"):
        assert compose_config([f"method={method}"]).method.loss.entropy_aware is False, method
